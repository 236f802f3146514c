"""Recipes for opening stores, so that tests and child processes open the same one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from kds._registry import store_class

if TYPE_CHECKING:
    from kds.store import Store

__all__ = ["StoreFactory", "StoreSpec"]


@attrs.frozen
class StoreSpec:
    """A picklable recipe for one store: a registered name (or ``module:Class``) and kwargs.

    A child process given the same spec opens the same data, which is how the
    crash tests reopen a store another process was writing.

    Attributes:
        backend: a name from :data:`kds._registry.STORES` or a ``module:Class`` path.
        kwargs: keyword arguments for the class (paths, DSNs, intervals).
    """

    backend: str
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)

    def create(self) -> Store:
        """Construct the store (not yet open)."""
        return store_class(self.backend)(**self.kwargs)


@attrs.frozen
class StoreFactory:
    """Hands out empty, isolated stores of one backend; what the conformance suite takes.

    Attributes:
        name: the backend's name, used in test ids.
        new_spec: returns a recipe for a new, empty, isolated store each call.
        durable: whether data survives the process (and so the crash tests apply).
    """

    name: str
    new_spec: Callable[[], Awaitable[StoreSpec]]
    durable: bool

    async def create(self) -> Store:
        """A new, empty, isolated store, not yet open: use it with ``async with``."""
        return (await self.new_spec()).create()
