"""Backend names to ``module:Class`` paths, imported only when asked for.

``kds`` never imports a backend at import time, so a missing optional dependency
only matters to whoever selects that backend -- and then it is a clear
:class:`~kds.errors.ConfigError` naming the ``pip install`` that fixes it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

from kds.errors import ConfigError

if TYPE_CHECKING:
    from kds.store import Store

__all__ = ["STORES", "store_class", "store_name"]

STORES: Final = {
    "memory": "kds.testing.memory:MemoryStore",
    "sqlite": "kds_stores.sqlite:SQLiteStore",
    "postgres": "kds_stores.postgres:PostgresStore",
    "kubernetes": "kds_stores.kubernetes:KubernetesStore",
}
"""Built-in store names; any other ``package.module:Class`` path is accepted too."""

_EXTRAS: Final = {"postgres": "postgres", "kubernetes": "kubernetes"}


def store_class(name: str) -> type[Store]:
    """Return the store class registered as *name*, or named by a ``module:Class`` path.

    Raises:
        ConfigError: the name is unknown, its module cannot be imported (naming the
            extra to install), or it does not name a :class:`~kds.Store` subclass.
    """
    from kds.store import Store

    target = STORES.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown store {name!r}: use one of {', '.join(sorted(STORES))} "
            "or a 'package.module:Class' path"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = _EXTRAS.get(name)
        hint = f"; install it with `pip install 'kds[{extra}]'`" if extra else ""
        raise ConfigError(f"store {name!r} cannot be imported: {exc}{hint}") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or not issubclass(cls, Store):
        raise ConfigError(f"store {name!r}: {target} is not a kds.Store subclass")
    return cls


def store_name(store: Store) -> str:
    """The registered name of *store*'s class (``sqlite``), or its ``module:Class`` path."""
    path = f"{type(store).__module__}:{type(store).__qualname__}"
    return next((name for name, target in STORES.items() if target == path), path)
