"""Error documents of the HTTP API (Kuma's ``/std-errors`` shape) and their translation.

Every error the API answers is one JSON object::

    {"type": "/std-errors", "status": 400, "title": "Invalid request",
     "detail": "spec.mtls: must be a mapping, got list",
     "invalid_parameters": [{"field": "spec.mtls", "reason": "must be a mapping, got list"}]}

Handlers raise :class:`Problem`; the server's middleware turns it, the kds errors a
store raises and aiohttp's own HTTP errors into such a document. Anything else is a
500 whose document says nothing about the cause (the log has the traceback).
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from kds.errors import ValidationError

__all__ = [
    "ERROR_TYPE",
    "TITLES",
    "Problem",
    "dumps",
    "http_problem",
    "json_kind",
    "json_response",
    "public_field",
    "read_json",
    "store_unavailable",
    "unexpected_failure",
]

logger = logging.getLogger(__name__)

ERROR_TYPE: Final = "/std-errors"
"""The ``type`` of every error document (Kuma's)."""

TITLES: Final[Mapping[int, str]] = {
    400: "Invalid request",
    403: "Access denied",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    500: "Internal server error",
    503: "Service unavailable",
}
"""The ``title`` of error documents by status."""

# A commit's ValidationError names "changes[0].spec.x" or "changes[0].key.name": the
# client only sent one resource, whose fields are "spec.x" and "name".
_CHANGE_PREFIX: Final = re.compile(r"^changes\[\d+\]\.")


def dumps(value: object) -> str:
    """Serialise a response body: UTF-8 JSON, non-ASCII characters as they are."""
    return json.dumps(value, ensure_ascii=False)


def json_response(value: object, *, status: int = 200) -> web.Response:
    """A JSON response with *value* as its body."""
    return web.json_response(value, status=status, dumps=dumps)


def public_field(field: str) -> str:
    """The field a client sent, for a store's :class:`ValidationError` field name."""
    return _CHANGE_PREFIX.sub("", field).removeprefix("key.")


class Problem(Exception):
    """Raised by a handler to answer with an error document.

    Args:
        status: the HTTP status.
        detail: what went wrong, for a person.
        invalid_parameters: ``(field, reason)`` pairs naming what was wrong in the
            request (its body, path or query).
        title: overrides the status's usual title.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        invalid_parameters: Sequence[tuple[str, str]] = (),
        *,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title or TITLES.get(status, "Error")
        self.detail = detail
        self.invalid_parameters = tuple(invalid_parameters)

    @classmethod
    def invalid(cls, field: str, reason: str) -> Problem:
        """A 400 naming one bad field; the detail reads ``field: reason``."""
        return cls(400, f"{field}: {reason}", [(field, reason)])

    @classmethod
    def from_validation(cls, error: ValidationError) -> Problem:
        """A 400 for a :class:`~kds.errors.ValidationError`, with the client's field name."""
        return cls.invalid(public_field(error.field), error.reason)

    def document(self) -> dict[str, Any]:
        """The error document."""
        return {
            "type": ERROR_TYPE,
            "status": self.status,
            "title": self.title,
            "detail": self.detail,
            "invalid_parameters": [
                {"field": field, "reason": reason} for field, reason in self.invalid_parameters
            ],
        }

    def response(self) -> web.Response:
        """The error document as a response."""
        return json_response(self.document(), status=self.status)


def json_kind(value: object) -> str:
    """What a decoded JSON value is, for messages: ``a list``, ``an object``, ``null``..."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def store_unavailable(request: web.BaseRequest, error: Exception) -> web.Response:
    """503 for a request the store could not serve (it is down or closing); logged."""
    logger.warning("%s %s: the store is unavailable: %s", request.method, request.path, error)
    return Problem(503, "the store is unavailable; retry later").response()


def unexpected_failure(request: web.BaseRequest) -> web.Response:
    """500 for an unexpected exception (being handled): nothing of the cause is said.

    The traceback is logged with an id the answer quotes, to find it by.
    """
    error_id = uuid.uuid4().hex[:12]
    logger.exception(
        "%s %s failed with an unexpected error (error id %s)",
        request.method,
        request.path,
        error_id,
    )
    return Problem(
        500,
        "the control plane could not handle this request; its log has the details under "
        f"error id {error_id}",
    ).response()


async def read_json(request: web.BaseRequest, *, max_body_size: int) -> object:
    """The request's body as strict JSON: no duplicate keys, NaN or infinities.

    Raises:
        Problem: 413 for a body over *max_body_size* bytes; 400 naming ``body`` for an
            empty body, one that is not UTF-8 or not valid JSON, or one nested too deeply.
    """
    too_large = Problem(
        413,
        f"the request body is larger than the limit of {max_body_size} bytes",
        [("body", f"must be at most {max_body_size} bytes")],
    )
    if request.content_length is not None and request.content_length > max_body_size:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if not raw.strip():
        raise Problem.invalid("body", "is empty: expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem.invalid("body", f"is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise Problem.invalid(
            "body", f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise Problem.invalid("body", "is nested too deeply") from None
    except ValueError as exc:
        raise Problem.invalid("body", f"is not valid JSON: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def http_problem(request: web.BaseRequest, exc: web.HTTPException) -> Problem:
    """An error document for an error aiohttp raised itself (no route, wrong method)."""
    if isinstance(exc, web.HTTPNotFound):
        return Problem(404, f"there is no endpoint at {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return Problem(
            405, f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
        )
    return Problem(exc.status, exc.reason)
