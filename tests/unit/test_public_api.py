"""The public API is documented, and concrete backends are final (trio's rule)."""

from __future__ import annotations

import inspect

import pytest

import kds
import kds.testing
from kds import Store
from kds_stores.sqlite import SQLiteStore

PUBLIC = {
    name: value
    for module in (kds, kds.testing)
    for name, value in vars(module).items()
    if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
}


def test_public_api_is_not_empty():
    assert {"Store", "Resource", "ResourceKey", "Codec", "MemoryStore", "hashed_name"} <= set(
        PUBLIC
    )


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_are_documented(name):
    assert inspect.getdoc(PUBLIC[name]), f"{name} has no docstring"


@pytest.mark.parametrize("name", sorted(n for n, v in PUBLIC.items() if inspect.isclass(v)))
def test_public_methods_are_documented(name):
    cls = PUBLIC[name]
    for attribute, member in vars(cls).items():
        if attribute.startswith("_") or not callable(member):
            continue
        assert inspect.getdoc(getattr(cls, attribute)), f"{name}.{attribute} has no docstring"


@pytest.mark.parametrize("backend", [kds.testing.MemoryStore, SQLiteStore])
def test_backends_are_final(backend):
    assert issubclass(backend, Store)
    assert getattr(backend, "__final__", False), f"{backend.__name__} is not @final"
