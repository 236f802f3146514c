"""The API's route table: one :class:`Route` per method and path.

The server registers its handlers from this table and the OpenAPI document is
generated from it, so the document describes exactly what the server serves.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import attrs
from aiohttp import web

from kds.api.problems import Problem

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "Handler",
    "Page",
    "Route",
    "page_of",
    "path_parameters",
]

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
"""An aiohttp request handler."""

Schema = Mapping[str, Any]
"""A JSON Schema (as OpenAPI 3.1 uses them)."""

T = TypeVar("T")

_PATH_PARAMETER: Final = re.compile(r"\{(\w+)\}")
_MAX_DIGITS: Final = 12  # longer numbers in size or offset are mistakes, not lists


@attrs.frozen(kw_only=True)
class Route:
    """One endpoint: what the server runs and what the OpenAPI document says of it.

    Attributes:
        method: ``GET``, ``POST``, ``PUT`` or ``DELETE``.
        path: the path template, with ``{mesh}`` and ``{name}`` parameters.
        handler: the aiohttp handler.
        operation_id: the OpenAPI ``operationId`` (unique).
        summary: one line for the document.
        tag: groups operations in the document (the type name, ``Zones``, ...).
        responses: success status -> (description, schema of the body).
        errors: the error statuses the endpoint may answer besides 500.
        paged: whether the endpoint takes ``size`` and ``offset``.
        body: the schema of the request body, if it takes one.
        write: whether it changes data (and so needs the admin token from
            non-loopback clients).
        media_type: the media type of the success body.
    """

    method: str
    path: str
    handler: Handler = attrs.field(eq=False)
    operation_id: str
    summary: str
    tag: str
    responses: Mapping[int, tuple[str, Schema]]
    errors: tuple[int, ...] = ()
    paged: bool = False
    body: Schema | None = None
    write: bool = False
    media_type: str = "application/json"


def path_parameters(path: str) -> list[str]:
    """The names of the parameters in a path template, in order."""
    return _PATH_PARAMETER.findall(path)


@attrs.frozen
class Page:
    """Which part of a list to answer: ``size`` items from ``offset``."""

    size: int
    offset: int

    def wrap(
        self,
        request: web.Request,
        items: Sequence[T],
        render: Callable[[T], Any] = lambda item: item,
    ) -> dict[str, Any]:
        """Return ``{"total", "items", "next"}`` for this page of *items* (all of them).

        Only the items on the page are passed through *render*. ``next`` is the URL
        of the following page, or ``None`` on the last one.
        """
        end = self.offset + self.size
        following = (
            str(request.url.with_query({"size": self.size, "offset": end}))
            if end < len(items)
            else None
        )
        return {
            "total": len(items),
            "items": [render(item) for item in items[self.offset : end]],
            "next": following,
        }


def page_of(request: web.Request) -> Page:
    """Read ``size`` (1 to 1000, default 100) and ``offset`` (default 0) from the query.

    Raises:
        Problem: 400 naming the parameter that is unknown, repeated or out of range.
    """
    query = request.query
    for name in query:
        if name not in ("size", "offset"):
            raise Problem.invalid(name, "unknown query parameter: lists take size and offset")
    size = _integer(query.getall("size", []), "size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    offset = _integer(query.getall("offset", []), "offset", 0, 0, None)
    return Page(size, offset)


def _integer(values: list[str], name: str, default: int, low: int, high: int | None) -> int:
    if not values:
        return default
    if len(values) > 1:
        raise Problem.invalid(name, "is given more than once")
    text = values[0]
    # int() would accept " 5", "+5" and "5_0": only plain digits are a number here.
    if not text.isascii() or not text.isdigit():
        raise Problem.invalid(name, f"must be a whole number, got {text!r}")
    if len(text) > _MAX_DIGITS:
        raise Problem.invalid(name, f"is too large: {text}")
    value = int(text)
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise Problem.invalid(name, f"must be {bounds}, got {value}")
    return value
