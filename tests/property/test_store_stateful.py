"""Every backend against the reference MemoryStore, under random sequences of operations."""

from __future__ import annotations

from hypothesis import settings

from kds.testing.stateful import run_store_model

# Each step of the machine checks the whole state of both stores. The Kubernetes store
# answers every read over HTTP (a list request per resource type), so it runs a fifth
# of the profile's examples: the ci and nightly profiles still give it hundreds.
_SLOW_BACKENDS = {"kubernetes": 5}


def test_store_matches_reference_model(store_factory):
    divisor = _SLOW_BACKENDS.get(store_factory.name, 1)
    examples = max(3, settings().max_examples // divisor)
    run_store_model(store_factory, settings=settings(settings(), max_examples=examples))
