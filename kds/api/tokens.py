"""The API's token endpoints: issue zone and dataplane tokens, rotate keys, revoke tokens.

Served by the global control plane, where the signing keys are (see
:mod:`kds.tokens`); a zone control plane answers each of them with 405 and says
to ask the global. All of them are writes: clients other than loopback need the
admin token. Kuma's shapes: ``POST /tokens/zone`` takes ``{"zone", "scope",
"validFor"}`` and answers the token itself as ``text/plain``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from kds import tokens
from kds.api.problems import Problem, json_kind, json_response
from kds.api.routes import Route

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from datetime import timedelta

    from kds.api.routes import Handler
    from kds.store import Store

__all__ = ["ZONE_REFUSAL", "token_routes"]

ZONE_REFUSAL: Final = (
    "tokens are issued by the global control plane, which keeps the signing keys: "
    "send this request to the global's API"
)
"""What a zone control plane answers (405) to the token endpoints."""

_MAX_IDS: Final = 1000  # token ids one revocation request may name
_MAX_SERIAL_DIGITS: Final = 9

_VALID_FOR: Final = {
    "type": "string",
    "description": "How long the token is valid: 720h (the default), 30m, 1h30m, 7d; "
    "at most 10 years.",
    "default": "720h",
}
_ZONE_BODY: Final = {
    "type": "object",
    "properties": {
        "zone": {"type": "string", "description": "The zone the token is for."},
        "scope": {
            "type": "array",
            "items": {"enum": sorted(tokens.ZONE_SCOPES)},
            "minItems": 1,
            "description": "What it allows: cp (the zone control plane), ingress, egress.",
        },
        "validFor": _VALID_FOR,
    },
    "required": ["zone", "scope"],
    "additionalProperties": False,
}
_DATAPLANE_BODY: Final = {
    "type": "object",
    "properties": {
        "mesh": {"type": "string", "description": "The mesh whose Dataplanes it may register."},
        "name": {
            "type": "string",
            "description": "The only Dataplane it may register (any in the mesh without).",
        },
        "validFor": _VALID_FOR,
    },
    "required": ["mesh"],
    "additionalProperties": False,
}
_REVOCATION_BODY: Final = {
    "type": "object",
    "properties": {
        "ids": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "description": "Token ids (their jti claims) to revoke.",
        }
    },
    "required": ["ids"],
    "additionalProperties": False,
}
_TOKEN: Final = {"type": "string", "description": "The token (a JWT)."}
_SERIAL: Final = {
    "type": "object",
    "properties": {"serial": {"type": "integer", "minimum": 1}},
    "required": ["serial"],
}
_EMPTY: Final = {"type": "object", "maxProperties": 0}
_ON_A_ZONE: Final = " (global only: a zone answers 405)"


def token_routes(
    store: Store,
    *,
    mode: str,
    authorize: Callable[[web.Request], None],
    read_json: Callable[[web.Request], Awaitable[object]],
) -> list[Route]:
    """The token endpoints of a control plane's API.

    Args:
        store: the control plane's store.
        mode: ``"global"`` serves them; ``"zone"`` answers each with 405.
        authorize: refuses (raises :class:`~kds.api.problems.Problem` 403) a write
            from a client without the right to write.
        read_json: reads the request body as strict JSON (raising a 400 or 413).
    """
    endpoints = _TokenEndpoints(store, authorize, read_json)

    def serve(handler: Handler) -> Handler:
        return handler if mode == "global" else _refuse_on_a_zone

    tag = "Tokens"
    return [
        Route(
            method="POST",
            path="/tokens/zone",
            handler=serve(endpoints.zone_token),
            operation_id="generateZoneToken",
            summary="Issue a zone token for a zone and scopes" + _ON_A_ZONE,
            tag=tag,
            responses={200: ("The token", _TOKEN)},
            errors=(400, 403, 405, 413, 503),
            body=_ZONE_BODY,
            write=True,
            media_type="text/plain",
        ),
        Route(
            method="POST",
            path="/tokens/dataplane",
            handler=serve(endpoints.dataplane_token),
            operation_id="generateDataplaneToken",
            summary="Issue a dataplane token for a mesh (and a Dataplane)" + _ON_A_ZONE,
            tag=tag,
            responses={200: ("The token", _TOKEN)},
            errors=(400, 403, 405, 413, 503),
            body=_DATAPLANE_BODY,
            write=True,
            media_type="text/plain",
        ),
        Route(
            method="POST",
            path="/tokens/zone/signing-keys",
            handler=serve(endpoints.rotate),
            operation_id="rotateZoneTokenSigningKey",
            summary="Create a new signing key, which signs tokens from now on" + _ON_A_ZONE,
            tag=tag,
            responses={201: ("The new key's serial", _SERIAL)},
            errors=(403, 405, 409, 503),
            write=True,
        ),
        Route(
            method="DELETE",
            # {name} is the key's serial (the API's path parameters are mesh and name).
            path="/tokens/zone/signing-keys/{name}",
            handler=serve(endpoints.remove_key),
            operation_id="removeZoneTokenSigningKey",
            summary="Remove the signing key with this serial: the tokens it signed stop "
            "being valid" + _ON_A_ZONE,
            tag=tag,
            responses={200: ("Removed", _EMPTY)},
            errors=(400, 403, 404, 405, 409, 503),
            write=True,
        ),
        Route(
            method="POST",
            path="/tokens/zone/revocations",
            handler=serve(endpoints.revoke),
            operation_id="revokeTokens",
            summary="Revoke zone or dataplane tokens by id (their jti claims)" + _ON_A_ZONE,
            tag=tag,
            responses={200: ("Revoked", _EMPTY)},
            errors=(400, 403, 405, 409, 413, 503),
            body=_REVOCATION_BODY,
            write=True,
        ),
    ]


async def _refuse_on_a_zone(request: web.Request) -> web.StreamResponse:
    raise Problem(405, ZONE_REFUSAL)


class _TokenEndpoints:
    """The handlers, over the global's store."""

    def __init__(
        self,
        store: Store,
        authorize: Callable[[web.Request], None],
        read_json: Callable[[web.Request], Awaitable[object]],
    ) -> None:
        self.store = store
        self.authorize = authorize
        self.read_json = read_json

    async def zone_token(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        body = await self._body(request, required=("zone", "scope"), optional=("validFor",))
        zone = _checked("zone", tokens.check_zone, body["zone"])
        scope = body["scope"]
        if not isinstance(scope, list):
            raise Problem.invalid("scope", f"must be a list of scopes, got {json_kind(scope)}")
        scopes = _checked("scope", tokens.check_scopes, scope)
        valid_for = _valid_for(body)
        try:
            token = await tokens.issue_zone_token(
                self.store, zone=zone, scopes=scopes, valid_for=valid_for
            )
        except tokens.UnusableSigningKeyError as exc:
            raise Problem(500, str(exc)) from None
        return web.Response(text=token, content_type="text/plain")

    async def dataplane_token(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        body = await self._body(request, required=("mesh",), optional=("name", "validFor"))
        mesh = _checked("mesh", tokens.check_mesh, body["mesh"])
        name = body.get("name")
        if name is not None:
            name = _checked("name", tokens.check_proxy_name, name)
        valid_for = _valid_for(body)
        try:
            token = await tokens.issue_dataplane_token(
                self.store, mesh=mesh, name=name, valid_for=valid_for
            )
        except tokens.UnusableSigningKeyError as exc:
            raise Problem(500, str(exc)) from None
        return web.Response(text=token, content_type="text/plain")

    async def rotate(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        serial = await tokens.rotate_signing_key(self.store)
        return json_response({"serial": serial}, status=201)

    async def remove_key(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        text = request.match_info["name"]
        if not (text.isascii() and text.isdigit()) or len(text) > _MAX_SERIAL_DIGITS:
            raise Problem.invalid("serial", f"must be a key's serial (1, 2, ...), got {text!r}")
        serial = int(text)
        if serial < 1:
            raise Problem.invalid("serial", f"must be 1 or more, got {serial}")
        try:
            await tokens.remove_signing_key(self.store, serial)
        except LookupError:
            raise Problem(404, f"there is no zone token signing key {serial}") from None
        except tokens.LastSigningKeyError as exc:
            raise Problem(409, str(exc)) from None
        return json_response({})

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        body = await self._body(request, required=("ids",), optional=())
        ids = body["ids"]
        if not isinstance(ids, list):
            raise Problem.invalid("ids", f"must be a list of token ids, got {json_kind(ids)}")
        if not ids:
            raise Problem.invalid("ids", "must name at least one token id")
        if len(ids) > _MAX_IDS:
            raise Problem.invalid("ids", f"names {len(ids)} ids; at most {_MAX_IDS} at a time")
        checked = [_checked(f"ids[{i}]", tokens.check_token_id, item) for i, item in enumerate(ids)]
        await tokens.revoke(self.store, checked)
        return json_response({})

    async def _body(
        self, request: web.Request, *, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> Mapping[str, Any]:
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise Problem.invalid("body", f"must be a JSON object, got {json_kind(body)}")
        known = (*required, *optional)
        for field in body:
            if field not in known:
                raise Problem.invalid(field, f"unknown field: expected {', '.join(known)}")
        for field in required:
            if body.get(field) is None:
                raise Problem.invalid(field, "is required")
        return body


def _valid_for(body: Mapping[str, Any]) -> timedelta:
    text = body.get("validFor")
    if text is None:
        return tokens.DEFAULT_VALIDITY
    if not isinstance(text, str):
        raise Problem.invalid("validFor", f"must be a duration such as 720h, got {json_kind(text)}")
    valid_for: timedelta = _checked("validFor", tokens.parse_duration, text)
    _checked("validFor", tokens.check_validity, valid_for)
    return valid_for


def _checked(field: str, check: Callable[[Any], Any], value: object) -> Any:
    """*check(value)*, a ValueError turned into a 400 naming *field*."""
    try:
        return check(value)
    except ValueError as exc:
        raise Problem.invalid(field, str(exc)) from None
