"""What a kds session puts on NATS: subjects, message envelopes and the handshake.

A session is two subjects under the transport's prefix, one per direction::

    <prefix>.s.<session-id>.z2g     the zone publishes, the global subscribes
    <prefix>.s.<session-id>.g2z     the global publishes, the zone subscribes

and a zone opens it with a request on :func:`connect_subject` whose reply subject
is its ``g2z`` subject (see :class:`ConnectRequest` and :class:`ConnectReply`).

Every message on a session subject is an envelope: a 9-byte header, then a body
whose meaning depends on the kind:

====  ==========  ==================================================================
kind  name        body
====  ==========  ==================================================================
0     DATA        the last (or only) piece of a frame
1     PART        a piece of a frame; more follow, up to a DATA
2     ACK         8 bytes: the total credit the receiver has consumed so far
3     CREDIT      empty: the sender waits for credit, acknowledge what you consumed
4     PING        empty: keepalive, sent when nothing else was for a while
5     CLOSE       UTF-8 reason; nothing follows
6     ACCEPT      JSON :class:`ConnectReply`; the global's answer (sequence 0)
7     REFUSE      UTF-8 reason; the global refused the session (sequence 0)
====  ==========  ==================================================================

The header is the kind (one byte) and a sequence number (8 bytes, big-endian).
Each direction numbers its messages 1, 2, 3, ... (all kinds but the handshake's
ACCEPT and REFUSE, which are 0): NATS core delivers at most once, so a receiver
that sees any other number than the next one knows that messages were lost (or
forged) and ends the session instead of passing on a stream with a hole in it.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from typing import Any, Final

import attrs

__all__ = [
    "FRAME_COST",
    "HEADER",
    "PROTOCOL_VERSION",
    "QUEUE_GROUP",
    "ConnectReply",
    "ConnectRequest",
    "Kind",
    "connect_subject",
    "decode",
    "decode_counter",
    "encode",
    "encode_counter",
    "session_subjects",
    "valid_prefix",
    "valid_session_id",
]

PROTOCOL_VERSION: Final = 1
"""The version of this message format; a global refuses requests of other versions."""

HEADER: Final = struct.Struct(">BQ")
"""Kind, then sequence number."""

_COUNTER: Final = struct.Struct(">Q")

FRAME_COST: Final = 64
"""Credit a frame costs on top of its length (bytes), so that empty frames count too."""

QUEUE_GROUP: Final = "kds-global"
"""The queue group globals subscribe to connect requests in: NATS hands each
request to exactly one of the globals sharing a prefix."""

_SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
_PREFIX_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]+")


class Kind(enum.IntEnum):
    """What a message on a session subject carries (see the module's table)."""

    DATA = 0
    PART = 1
    ACK = 2
    CREDIT = 3
    PING = 4
    CLOSE = 5
    ACCEPT = 6
    REFUSE = 7


_KINDS: Final = tuple(Kind)  # indexed by value (0, 1, 2, ...): cheaper than Kind(value)


def valid_prefix(prefix: str) -> bool:
    """Whether *prefix* is a usable subject prefix: dot-separated plain tokens."""
    return bool(prefix) and all(_PREFIX_TOKEN.fullmatch(token) for token in prefix.split("."))


def valid_session_id(session_id: str) -> bool:
    """Whether *session_id* is one subject token of 8 to 64 letters, digits, ``_`` or ``-``."""
    return _SESSION_ID.fullmatch(session_id) is not None


def connect_subject(prefix: str) -> str:
    """The subject zones send connect requests to."""
    return f"{prefix}.connect"


def session_subjects(prefix: str, session_id: str) -> tuple[str, str]:
    """The ``(zone to global, global to zone)`` subjects of a session."""
    base = f"{prefix}.s.{session_id}"
    return f"{base}.z2g", f"{base}.g2z"


def encode(kind: Kind, sequence: int, body: bytes = b"") -> bytes:
    """One envelope: the header, then *body*."""
    return HEADER.pack(kind, sequence) + body


def encode_counter(value: int) -> bytes:
    """An ACK's body."""
    return _COUNTER.pack(value)


def decode_counter(body: bytes) -> int:
    """An ACK's body, read back.

    Raises:
        ValueError: it is not 8 bytes long.
    """
    if len(body) != _COUNTER.size:
        raise ValueError(f"an ACK body is {_COUNTER.size} bytes, not {len(body)}")
    value: int = _COUNTER.unpack(body)[0]
    return value


def decode(message: bytes) -> tuple[Kind, int, bytes]:
    """The kind, sequence number and body of an envelope.

    Raises:
        ValueError: the message is shorter than a header or of an unknown kind.
    """
    if len(message) < HEADER.size:
        raise ValueError(f"a {len(message)}-byte message is shorter than the envelope header")
    kind, sequence = HEADER.unpack_from(message)
    if kind >= len(_KINDS):
        raise ValueError(f"unknown message kind {kind}")
    return _KINDS[kind], sequence, message[HEADER.size :]


def _positive_int(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_number(data: dict[str, Any], name: str) -> float:
    value = data.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _load(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    version = data.get("version")
    if version != PROTOCOL_VERSION:
        raise ValueError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    return data


@attrs.frozen(kw_only=True)
class ConnectRequest:
    """What a zone sends on :func:`connect_subject` to open a session (JSON).

    The zone's name and credentials travel here as gRPC's call metadata carries
    them, so the global's ``authenticate`` hook sees the same values over both
    transports. Anyone allowed to subscribe to the connect subject can read them:
    see ``docs/nats.md`` for the permissions that keep them between zones and
    globals.

    Attributes:
        session: the session id the zone chose (:func:`valid_session_id`).
        zone: the zone's claimed name.
        credentials: its credentials (a zone token).
        address: where the zone is, for the global's logs (the client IP NATS
            reported to it); never used for authorization.
        max_frame_size: the largest frame the zone sends or accepts.
        window: the credit, in bytes, the zone grants the global.
        keepalive_interval: seconds between the zone's keepalive messages.
        max_payload: the largest message the zone's NATS server accepts.
    """

    session: str
    zone: str | None
    credentials: str | None = attrs.field(repr=False)
    address: str
    max_frame_size: int
    window: int
    keepalive_interval: float
    max_payload: int

    def to_json(self) -> bytes:
        """The request's payload."""
        return json.dumps({"version": PROTOCOL_VERSION, **attrs.asdict(self)}).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> ConnectRequest:
        """Read a request.

        Raises:
            ValueError: it is malformed or of another protocol version.
        """
        data = _load(payload)
        session = data.get("session")
        if not isinstance(session, str) or not valid_session_id(session):
            raise ValueError(f"invalid session id {session!r}")
        return cls(
            session=session,
            zone=_optional_str(data, "zone"),
            credentials=_optional_str(data, "credentials"),
            address=_optional_str(data, "address") or "unknown",
            max_frame_size=_positive_int(data, "max_frame_size"),
            window=_positive_int(data, "window"),
            keepalive_interval=_positive_number(data, "keepalive_interval"),
            max_payload=_positive_int(data, "max_payload"),
        )


@attrs.frozen(kw_only=True)
class ConnectReply:
    """The body of the global's ACCEPT (JSON): the session's subjects and terms.

    Attributes:
        z2g: the subject the global receives the zone's messages on.
        g2z: the subject the global sends on (the request's reply subject).
        instance: the global instance serving the session, for logs.
        max_frame_size: the session's frame size limit (the smaller of both).
        window: the credit, in bytes, the global grants the zone.
        keepalive_interval: seconds between the global's keepalive messages.
        max_payload: the largest message the global's NATS server accepts.
    """

    z2g: str
    g2z: str
    instance: str
    max_frame_size: int
    window: int
    keepalive_interval: float
    max_payload: int

    def to_json(self) -> bytes:
        """The ACCEPT's body."""
        return json.dumps({"version": PROTOCOL_VERSION, **attrs.asdict(self)}).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> ConnectReply:
        """Read a reply.

        Raises:
            ValueError: it is malformed or of another protocol version.
        """
        data = _load(payload)
        subjects = {name: data.get(name) for name in ("z2g", "g2z")}
        for name, value in subjects.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a subject, got {value!r}")
        return cls(
            z2g=str(subjects["z2g"]),
            g2z=str(subjects["g2z"]),
            instance=_optional_str(data, "instance") or "unknown",
            max_frame_size=_positive_int(data, "max_frame_size"),
            window=_positive_int(data, "window"),
            keepalive_interval=_positive_number(data, "keepalive_interval"),
            max_payload=_positive_int(data, "max_payload"),
        )
