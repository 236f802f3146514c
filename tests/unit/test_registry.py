from __future__ import annotations

import sys

import pytest

from kds import ConfigError, store_class
from kds.testing import MemoryStore, StoreSpec


def test_builtin_names_resolve_lazily():
    assert store_class("memory") is MemoryStore
    assert store_class("kds.testing.memory:MemoryStore") is MemoryStore


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown store 'mysql'.*memory.*sqlite"):
        store_class("mysql")


def test_missing_module_names_the_extra_to_install(monkeypatch):
    # As on a machine without the extra: the client library cannot be imported.
    monkeypatch.delitem(sys.modules, "kds_stores.kubernetes", raising=False)
    monkeypatch.setitem(sys.modules, "kubernetes_asyncio", None)
    with pytest.raises(ConfigError, match=r"pip install 'kds\[kubernetes\]'"):
        store_class("kubernetes")


def test_a_path_that_is_not_a_store_is_refused():
    with pytest.raises(ConfigError, match=r"not a kds\.Store subclass"):
        store_class("kds.errors:KdsError")
    with pytest.raises(ConfigError, match="cannot be imported"):
        store_class("no_such_module_here:Store")


def test_store_spec_creates_unopened_stores():
    store = StoreSpec("memory").create()
    assert isinstance(store, MemoryStore)
