"""Every backend against the reference MemoryStore, under random sequences of operations."""

from __future__ import annotations

from kds.testing.stateful import run_store_model


def test_store_matches_reference_model(store_factory):
    run_store_model(store_factory)
