"""The sync protocol: versioned msgpack frames, their chunking and their order.

A session (:class:`kds.Session`) carries two replication streams at once: the
global's log to the zone and the zone's log to the global. Every frame is one
msgpack map whose ``kind`` says which frame it is; the events of a Batch and the
resources of a Reset inside it are positional arrays ("rows"), which are smaller
and faster to decode than maps. ``docs/protocol.md`` describes the encoding, the
session and the rules this module enforces.

* :func:`encode_frame` and :func:`decode_frame` turn frames into bytes and back.
  Decoding is strict (a field of the wrong type is an error naming its path) but
  ignores map keys it does not know and elements past the end of a row, which is
  how a newer peer adds optional fields without breaking an older one.
* :func:`batch_frames` and :func:`reset_frames` split events and snapshots into
  frames under a size limit; :func:`pack_resource` and :func:`encode_reset` let a
  sender encode each resource of a snapshot once, however many peers it goes to.
* :func:`negotiate` picks the protocol version and features from a Hello.
* :class:`ProtocolChecker` validates the order of the frames one side sends and
  receives, before anything is applied.

Resource contents are not validated here: the receiver checks each resource
against its catalog and NACKs the ones it refuses, so that one bad resource does
not stop the others. Decoding only refuses resource types the catalog does not
know, since a peer sends only the types the other side declared in the handshake.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, TypeAlias, TypeVar, cast, get_args, get_origin

import attrs
import cattrs
import msgpack
from cattrs.cols import list_structure_factory
from cattrs.gen import make_dict_structure_fn
from cattrs.v import format_exception

from kds.catalog import DEFAULT_CATALOG
from kds.codec import strict_converter, unpack
from kds.errors import DecodeError, FrameTooLargeError, ProtocolError, VersionMismatchError
from kds.resource import Catalog, Resource, ResourceKey
from kds.store import Cursor, Deleted, Event, Upserted

__all__ = [
    "FEATURES",
    "FRAME_KINDS",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Ack",
    "Batch",
    "Frame",
    "Goodbye",
    "GoodbyeCode",
    "Hello",
    "Nack",
    "Ping",
    "Pong",
    "ProtocolChecker",
    "Reject",
    "Rejection",
    "Reset",
    "Role",
    "Welcome",
    "batch_frames",
    "decode_frame",
    "encode_frame",
    "encode_reset",
    "negotiate",
    "pack_resource",
    "reset_frames",
]

PROTOCOL_VERSION: Final = 1
"""The newest major protocol version this code speaks.

Peers with no major version in common cannot talk (the global sends a Reject).
Compatible additions do not bump it: they are optional map keys, optional elements
appended to rows, or features."""

SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (PROTOCOL_VERSION,)
"""Every major protocol version this code speaks, oldest first."""

FEATURES: Final[frozenset[str]] = frozenset()
"""The optional features this code implements; a session uses those both sides list.

Version 1 of the protocol has none yet: a behaviour added later that an older
peer would not understand gets a feature string here, and is used only when the
Welcome lists it."""


class GoodbyeCode(enum.StrEnum):
    """Why a session is ended; the ``code`` of a :class:`Goodbye`.

    A peer may send a code this list does not have (a newer version's): treat an
    unknown code like :attr:`INTERNAL_ERROR`.
    """

    SHUTDOWN = "shutdown"
    """The sender is stopping (or restarting); reconnect later."""
    PROTOCOL_ERROR = "protocol-error"
    """The receiver of the Goodbye sent a frame that broke the protocol."""
    HEARTBEAT_TIMEOUT = "heartbeat-timeout"
    """Nothing was received from the other side for too long."""
    SUPERSEDED = "superseded"
    """A newer session of the same zone replaced this one."""
    ZONE_DISABLED = "zone-disabled"
    """The zone was disabled on the global; it should stay connected and wait."""
    INTERNAL_ERROR = "internal-error"
    """The sender failed (its store is unavailable, a bug); reconnect with backoff."""


# -- frames ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Hello:
    """The zone's first frame: who it is, what it speaks and where its stream stands.

    Attributes:
        protocol_versions: the major protocol versions the zone speaks.
        zone: the zone's name, as it claims it; the global authenticates it with
            *credentials* or the transport's verified identity.
        credentials: a zone token, or ``None`` when the zone has none.
        features: the optional features the zone implements.
        cursor: the last position of the global's log the zone applied (its
            tracking cursor), or ``None`` when it never applied anything. The
            global resumes after it, or resets when it cannot.
        max_frame_size: the largest frame the zone accepts, in bytes.
        types: the resource types the zone knows; the global sends no others.
        instance_id: identifies this zone control plane instance (for insights).
        software_version: the zone's software version (for insights).
        backend: the zone's store type (``sqlite``, ``postgres``, ...), shown as
            BACKEND by ``kdsctl inspect zones``; empty when unknown. Older zones omit it.
    """

    kind: ClassVar[str] = "hello"

    protocol_versions: tuple[int, ...]
    zone: str
    credentials: str | None = attrs.field(repr=False)
    features: frozenset[str]
    cursor: Cursor | None
    max_frame_size: int
    types: frozenset[str]
    instance_id: str
    software_version: str
    backend: str = ""


@attrs.frozen(kw_only=True)
class Welcome:
    """The global's answer to an accepted Hello; replication starts after it.

    Attributes:
        protocol_version: the major version the session uses (one the zone offered).
        features: the features the session uses: those both sides implement.
        instance_id: identifies the global instance serving the session.
        cursor: the last position of the zone's log the global applied, or
            ``None``. The zone resumes after it, or resets when it cannot.
        max_frame_size: the largest frame the global accepts, in bytes.
        types: the resource types the global knows; the zone sends no others.
        heartbeat_interval: seconds; each side sends a Ping when it has sent
            nothing for this long.
        software_version: the global's software version.
    """

    kind: ClassVar[str] = "welcome"

    protocol_version: int
    features: frozenset[str]
    instance_id: str
    cursor: Cursor | None
    max_frame_size: int
    types: frozenset[str]
    heartbeat_interval: float
    software_version: str


@attrs.frozen(kw_only=True)
class Reject:
    """The global's answer to a Hello it refuses; the global then ends the session.

    Attributes:
        reason: why, in words meant for the zone's operator (the zone logs it
            verbatim).
        retryable: whether connecting again may succeed without a change on the
            zone (the global is starting, overloaded); ``False`` for a version
            mismatch or bad credentials.
    """

    kind: ClassVar[str] = "reject"

    reason: str
    retryable: bool


@attrs.frozen(kw_only=True)
class Batch:
    """Events of the sender's log, in order, and the position they bring the receiver to.

    A sender filters its log (a zone gets neither its own resources back nor other
    types than it declared), so events may skip revisions, and a batch may carry
    no event at all just to move the receiver's cursor.

    Attributes:
        epoch: the sender's log epoch; the receiver's cursor must be in it.
        events: events with strictly increasing revisions, all after the
            receiver's position.
        revision: the receiver's position after this batch: at least the last
            event's revision.
    """

    kind: ClassVar[str] = "batch"

    epoch: str
    events: tuple[Event, ...]
    revision: int


@attrs.frozen(kw_only=True)
class Reset:
    """One chunk of a consistent snapshot of the sender's log at one revision.

    Sent instead of batches when the receiver's cursor cannot be resumed from
    (another epoch, compacted history, or no cursor). Chunks of one snapshot are
    numbered from 0 and the last is ``final``; the receiver replaces what it owns
    from the sender with the union of all chunks, then continues after
    ``revision``.

    Attributes:
        epoch: the sender's log epoch.
        revision: the revision the snapshot is consistent with.
        index: this chunk's number, from 0.
        resources: this chunk's resources; no key appears twice in a snapshot.
        final: whether this is the snapshot's last chunk.
    """

    kind: ClassVar[str] = "reset"

    epoch: str
    revision: int
    index: int
    resources: tuple[Resource, ...]
    final: bool


@attrs.frozen(kw_only=True)
class Ack:
    """The receiver applied a batch (or a whole reset) entirely.

    Attributes:
        revision: the batch's ``revision`` (or the reset's).
    """

    kind: ClassVar[str] = "ack"

    revision: int


@attrs.frozen
class Rejection:
    """One resource a receiver refused, and why.

    Attributes:
        key: the resource's key, as the sender sent it.
        reason: why it was refused, in words meant for an operator.
    """

    key: ResourceKey
    reason: str


@attrs.frozen(kw_only=True)
class Nack:
    """The receiver applied a batch (or a reset) except the resources it rejected.

    Its cursor moved to ``revision`` all the same: a rejected resource is sent
    again when it changes, not before.

    Attributes:
        revision: the batch's ``revision`` (or the reset's).
        rejected: the refused resources; at least one.
    """

    kind: ClassVar[str] = "nack"

    revision: int
    rejected: tuple[Rejection, ...]


@attrs.frozen(kw_only=True)
class Ping:
    """A heartbeat; the other side answers with a Pong of the same nonce.

    Attributes:
        nonce: any number not used by another unanswered Ping of the sender.
    """

    kind: ClassVar[str] = "ping"

    nonce: int


@attrs.frozen(kw_only=True)
class Pong:
    """The answer to a Ping.

    Attributes:
        nonce: the Ping's nonce.
    """

    kind: ClassVar[str] = "pong"

    nonce: int


@attrs.frozen(kw_only=True)
class Goodbye:
    """The sender is ending the session; sent last, just before closing it.

    Attributes:
        code: a :class:`GoodbyeCode` value (or a newer peer's code).
        reason: details for the other side's logs.
    """

    kind: ClassVar[str] = "goodbye"

    code: str
    reason: str


Frame: TypeAlias = Hello | Welcome | Reject | Batch | Reset | Ack | Nack | Ping | Pong | Goodbye
"""Any frame of the protocol."""

FRAME_KINDS: Final[Mapping[str, type[Frame]]] = {
    cls.kind: cls for cls in (Hello, Welcome, Reject, Batch, Reset, Ack, Nack, Ping, Pong, Goodbye)
}
"""Every frame class by its ``kind`` tag."""

_MISSING: Final = object()


# -- encoding ----------------------------------------------------------------------------


def _make_converter() -> cattrs.Converter:
    # Start from the codec's converter so that keys and cursors decode exactly as
    # Codec decodes them, with strict scalars. Batch and Reset frames, which carry
    # events and resources as rows, never go through it (see "rows" below).
    converter = strict_converter()

    def structure_attrs(cls: type) -> Callable[[Any, type], Any]:
        # cattrs would index a string or a list as if it were a map, and report a
        # confusing error about the first field; say what is wrong instead.
        structure: Callable[[Any, Any], Any] = make_dict_structure_fn(cls, converter)

        def hook(value: object, _: type) -> Any:
            if not isinstance(value, Mapping):
                raise TypeError(f"expected a map, got {type(value).__name__}")
            return structure(value, cls)

        return hook

    def is_array(type_: object) -> bool:
        args = get_args(type_)
        return get_origin(type_) is frozenset or (
            get_origin(type_) is tuple and len(args) == 2 and args[1] is Ellipsis
        )

    def is_set(type_: Any) -> bool:
        return type_ is frozenset or get_origin(type_) is frozenset

    def structure_array(type_: Any) -> Callable[[Any, type], Any]:
        # Stock cattrs builds a collection from any iterable: a string would become
        # a set of characters and a map a tuple of its keys.
        build: Callable[[list[Any]], Any] = frozenset if get_origin(type_) is frozenset else tuple
        list_type: Any = list[get_args(type_)[0]]  # type: ignore[misc]  # built at run time
        structure = list_structure_factory(list_type, converter)

        def hook(value: object, _: type) -> Any:
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            return build(structure(value, type_))

        return hook

    converter.register_structure_hook_factory(attrs.has, structure_attrs)
    converter.register_structure_hook_factory(is_array, structure_array)
    # Sorted, so that equal frames encode to equal bytes.
    converter.register_unstructure_hook_func(is_set, sorted)
    return converter


_CONVERTER: Final = _make_converter()


def _format_error(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, AttributeError):
        return "expected a map"  # cattrs read .items() of something that is not one
    return str(exc) or format_exception(exc, type_)


# -- rows: the events and resources of Batch and Reset frames -----------------------------
#
# Batch and Reset frames carry every replicated change, so their events and resources
# travel as positional arrays ("rows") rather than maps: a row does not repeat its
# field names, which makes a typical event about 40% smaller and lets msgpack unpack
# it in little more than half the time. Rows are built and read here, by hand, not
# by the converter (which knows only maps), with the converter's strictness: exact
# types, no coercion, a boolean is not an integer. The layouts are the wire format
# (docs/protocol.md); decoders ignore elements past the last one they know, as they
# ignore unknown map keys, so that a newer peer can append optional fields.
#
# Reading tests every element of a row in one expression; only when that fails does
# _row_error walk the row again to find which element is wrong and name it, so
# precise errors cost nothing until something is wrong.

_UPSERTED: Final = 0
_DELETED: Final = 1
_EVENT_TAGS: Final = "0 (upserted) or 1 (deleted)"

# The name of each element of a row, by position; errors name the element this way.
# The readers below unpack rows of exactly these lengths (8, 10 and 7 elements).
_RESOURCE_ROW: Final = (
    "type",
    "mesh",
    "name",
    "labels",
    "spec",
    "version",
    "created_at",
    "modified_at",
)
_UPSERTED_ROW: Final = ("kind", "revision", *_RESOURCE_ROW)
_DELETED_ROW: Final = ("kind", "revision", "type", "mesh", "name", "labels", "version")

_T = TypeVar("_T")


class _Invalid(Exception):
    """A Batch or Reset frame is malformed: *reason* about the value at *path*.

    Raised by the readers below with a path relative to what they read (``.revision``
    for an element of a row); the caller that knows where that is prefixes it.
    """

    def __init__(self, reason: str, path: str) -> None:
        super().__init__(reason, path)
        self.reason = reason
        self.path = path


def _wire_labels(labels: Mapping[str, str]) -> dict[str, str]:
    # msgpack packs dicts only; most labels are dicts already, and copying them
    # would cost as much as packing them.
    return labels if type(labels) is dict else dict(labels)


def _wire_resource(resource: Resource) -> list[Any]:
    key = resource.key
    return [
        key.type,
        key.mesh,
        key.name,
        _wire_labels(resource.labels),
        resource.spec,
        resource.version,
        resource.created_at.timestamp(),
        resource.modified_at.timestamp(),
    ]


def _wire_event(event: Event) -> list[Any]:
    if isinstance(event, Upserted):
        # _wire_resource's row, written out: building it in place costs less than
        # a call and a second list for every replicated event.
        resource = event.resource
        key = resource.key
        return [
            _UPSERTED,
            event.revision,
            key.type,
            key.mesh,
            key.name,
            _wire_labels(resource.labels),
            resource.spec,
            resource.version,
            resource.created_at.timestamp(),
            resource.modified_at.timestamp(),
        ]
    key = event.key
    return [
        _DELETED,
        event.revision,
        key.type,
        key.mesh,
        key.name,
        _wire_labels(event.labels),
        event.version,
    ]


class _Moments:
    """Reads the timestamps of one frame: the resources of one commit share theirs."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[float, datetime] = {}

    def __call__(self, value: object) -> datetime | None:
        """The moment *value* (Unix seconds) stands for; ``None`` if it is not a timestamp."""
        # Check the type before the cache: True would find the moment of 1.
        if type(value) is not int and type(value) is not float:
            return None
        seconds = cast("float", value)
        moment = self._seen.get(seconds)
        if moment is None:
            try:
                moment = datetime.fromtimestamp(seconds, UTC)
            except (OverflowError, ValueError, OSError):
                return None  # out of the platform's range, or NaN
            self._seen[seconds] = moment
        return moment


def _is_labels(value: object) -> bool:
    if type(value) is not dict:
        return False
    for name, label in value.items():
        if type(name) is not str or type(label) is not str:
            return False
    return True


def _read_resource(row: object, moments: _Moments) -> Resource:
    if type(row) is list and len(row) >= 8:
        type_, mesh, name, labels, spec, version, created, modified = (
            row if len(row) == 8 else row[:8]
        )
        created_at, modified_at = moments(created), moments(modified)
        if (
            type(type_) is str
            and (mesh is None or type(mesh) is str)
            and type(name) is str
            and type(spec) is dict
            and type(version) is int
            and created_at is not None
            and modified_at is not None
            and _is_labels(labels)
        ):
            return Resource(
                key=ResourceKey(type_, mesh, name),
                labels=labels,
                spec=spec,
                version=version,
                created_at=created_at,
                modified_at=modified_at,
            )
    raise _row_error(row, _RESOURCE_ROW, "a resource")


def _read_event(row: object, moments: _Moments) -> Event:
    if type(row) is list and row:
        tag, size = row[0], len(row)
        # Compare the tag's value first (the common case), then its type: True == 1.
        if tag == _UPSERTED and size >= 10 and type(tag) is int:
            _, revision, type_, mesh, name, labels, spec, version, created, modified = (
                row if size == 10 else row[:10]
            )
            created_at, modified_at = moments(created), moments(modified)
            if (
                type(revision) is int
                and type(type_) is str
                and (mesh is None or type(mesh) is str)
                and type(name) is str
                and type(spec) is dict
                and type(version) is int
                and created_at is not None
                and modified_at is not None
                and _is_labels(labels)
            ):
                resource = Resource(
                    key=ResourceKey(type_, mesh, name),
                    labels=labels,
                    spec=spec,
                    version=version,
                    created_at=created_at,
                    modified_at=modified_at,
                )
                return Upserted(revision=revision, resource=resource)
        elif tag == _DELETED and size >= 7 and type(tag) is int:
            _, revision, type_, mesh, name, labels, version = row if size == 7 else row[:7]
            if (
                type(revision) is int
                and type(type_) is str
                and (mesh is None or type(mesh) is str)
                and type(name) is str
                and type(version) is int
                and _is_labels(labels)
            ):
                key = ResourceKey(type_, mesh, name)
                return Deleted(revision=revision, key=key, version=version, labels=labels)
    raise _event_error(row)


def _event_error(row: object) -> _Invalid:
    """What is wrong with the event row *row*, which :func:`_read_event` refused."""
    if type(row) is not list:
        return _Invalid(f"expected an array, got {type(row).__name__}", "")
    if not row:
        return _Invalid("required field missing: the row is empty", ".kind")
    tag = row[0]
    if type(tag) is not int:
        return _Invalid(f"expected an integer, got {type(tag).__name__}", ".kind")
    if tag == _UPSERTED:
        return _row_error(row, _UPSERTED_ROW, "an upserted event")
    if tag == _DELETED:
        return _row_error(row, _DELETED_ROW, "a deleted event")
    return _Invalid(f"unknown event kind {tag}, expected {_EVENT_TAGS}", ".kind")


def _row_error(row: object, layout: tuple[str, ...], what: str) -> _Invalid:
    """The first thing wrong with *row* as a row of *layout*, naming the element."""
    if type(row) is not list:
        return _Invalid(f"expected an array, got {type(row).__name__}", "")
    for position, field in enumerate(layout):
        if position >= len(row):
            return _Invalid(
                f"required field missing: {what} has {len(layout)} elements, got {len(row)}",
                f".{field}",
            )
        problem = _element_problem(field, row[position])
        if problem is not None:
            return problem
    # Unreachable while the readers and this walk agree (the tests check that they do).
    return _Invalid(f"malformed {what}", "")


def _element_problem(field: str, value: object) -> _Invalid | None:
    """What is wrong with *value* as the row element called *field*, if anything."""
    got = type(value).__name__
    if field in {"revision", "version"}:
        if type(value) is not int:
            return _Invalid(f"expected an integer, got {got}", f".{field}")
    elif field in {"type", "name"}:
        if type(value) is not str:
            return _Invalid(f"expected a string, got {got}", f".{field}")
    elif field == "mesh":
        if value is not None and type(value) is not str:
            return _Invalid(f"expected a string or nil, got {got}", ".mesh")
    elif field == "spec":
        if type(value) is not dict:
            return _Invalid(f"expected a map, got {got}", ".spec")
    elif field == "labels":
        if type(value) is not dict:
            return _Invalid(f"expected a map, got {got}", ".labels")
        for name, label in value.items():
            if type(name) is not str:
                return _Invalid(f"expected string keys, got {type(name).__name__}", ".labels")
            if type(label) is not str:
                return _Invalid(
                    f"expected a string, got {type(label).__name__}", f".labels[{name!r}]"
                )
    elif field in {"created_at", "modified_at"}:
        if type(value) is not int and type(value) is not float:
            return _Invalid(f"expected a timestamp, got {got}", f".{field}")
        if _Moments()(value) is None:
            return _Invalid(f"timestamp out of range: {value!r}", f".{field}")
    return None


def _read_rows(
    rows: list[Any], read: Callable[[object, _Moments], _T], path: str
) -> tuple[_T, ...]:
    moments = _Moments()
    items: list[_T] = []
    append = items.append
    try:
        for row in rows:
            append(read(row, moments))
    except _Invalid as exc:
        raise _Invalid(exc.reason, f"{path}[{len(items)}]{exc.path}") from None
    return tuple(items)


_EXPECTED: Final[Mapping[type, str]] = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    list: "an array",
}


def _field(data: Mapping[str, object], name: str, expected: type[_T]) -> _T:
    """The field *name* of a frame's map, which must be exactly of type *expected*."""
    value = data.get(name, _MISSING)
    if type(value) is expected:
        return value
    if value is _MISSING:
        raise _Invalid("required field missing", f"$.{name}")
    raise _Invalid(f"expected {_EXPECTED[expected]}, got {type(value).__name__}", f"$.{name}")


def _read_batch(data: Mapping[str, object]) -> Batch:
    epoch = _field(data, "epoch", str)
    rows = _field(data, "events", list)
    revision = _field(data, "revision", int)
    events = _read_rows(rows, _read_event, "$.events")
    return Batch(epoch=epoch, events=events, revision=revision)


def _read_reset(data: Mapping[str, object]) -> Reset:
    epoch = _field(data, "epoch", str)
    revision = _field(data, "revision", int)
    index = _field(data, "index", int)
    rows = _field(data, "resources", list)
    final = _field(data, "final", bool)
    resources = _read_rows(rows, _read_resource, "$.resources")
    return Reset(epoch=epoch, revision=revision, index=index, resources=resources, final=final)


def _unstructure(frame: Frame) -> dict[str, Any]:
    if type(frame) is Batch:
        return {
            "kind": "batch",
            "epoch": frame.epoch,
            "events": [_wire_event(event) for event in frame.events],
            "revision": frame.revision,
        }
    if type(frame) is Reset:
        return {
            "kind": "reset",
            "epoch": frame.epoch,
            "revision": frame.revision,
            "index": frame.index,
            "resources": [_wire_resource(resource) for resource in frame.resources],
            "final": frame.final,
        }
    return {"kind": frame.kind, **_CONVERTER.unstructure(frame, type(frame))}


def encode_frame(frame: Frame) -> bytes:
    """Encode *frame* as a msgpack map tagged with its ``kind``.

    The events of a Batch and the resources of a Reset are encoded as rows
    (positional arrays); ``docs/protocol.md`` gives their layout.

    Raises:
        ValueError: the frame holds something msgpack cannot represent (an integer
            beyond 64 bits, a spec with an unsupported value).
    """
    data = _unstructure(frame)
    try:
        return msgpack.packb(data, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot encode {type(frame).__name__} frame: {exc}") from exc


def pack_resource(resource: Resource) -> bytes:
    """*resource* as a Reset frame's row, msgpack-encoded.

    With :func:`encode_reset`, a sender that sends one resource in many frames (a
    snapshot shared by many sessions) encodes it once.

    Raises:
        ValueError: the resource holds something msgpack cannot represent; the
            message names it.
    """
    try:
        return msgpack.packb(_wire_resource(resource), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot encode resource {resource.key}: {exc}") from exc


def encode_reset(frame: Reset, packed: Callable[[Resource], bytes]) -> bytes:
    """Encode *frame* as :func:`encode_frame` does, its rows taken from *packed*.

    Args:
        frame: the Reset frame.
        packed: each resource's row as :func:`pack_resource` encodes it (kept by
            the caller: this only joins bytes).

    Raises:
        ValueError: from *packed*.
    """
    packer = msgpack.Packer(use_bin_type=True)
    # The map encode_frame writes (its keys, in its order), with the rows spliced
    # in where its resources array goes.
    fields = _unstructure(attrs.evolve(frame, resources=()))
    parts = [packer.pack_map_header(len(fields))]
    for key, value in fields.items():
        parts.append(packer.pack(key))
        if key == "resources":
            parts.append(packer.pack_array_header(len(frame.resources)))
            parts.extend(packed(resource) for resource in frame.resources)
        else:
            parts.append(packer.pack(value))
    return b"".join(parts)


def decode_frame(data: bytes, *, catalog: Catalog = DEFAULT_CATALOG) -> Frame:
    """Decode one frame, checking every field's type and the frame's own invariants.

    Unknown map keys are ignored, and so are elements past the end of a row (a
    newer peer's optional additions). Resources are not validated beyond their type
    being in *catalog*; see the module docstring.

    Args:
        data: exactly one msgpack-encoded frame.
        catalog: the resource types the frame may carry.

    Raises:
        ProtocolError: *data* is not one msgpack map, its ``kind`` is unknown, a
            field is missing or of the wrong type, or the frame breaks its own
            rules (revisions out of order, an unknown resource type, a duplicate
            key). The message names the field: ``@ $.events[3].revision``.
        DecodeError: *data* is not bytes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes to decode, got {type(data).__name__}")
    unpacked = unpack(bytes(data), "frame", ProtocolError)
    if not isinstance(unpacked, dict):
        raise ProtocolError(f"invalid frame: expected a map, got {type(unpacked).__name__} @ $")
    if "kind" not in unpacked:
        raise ProtocolError("invalid frame: required field missing @ $.kind")
    kind = unpacked["kind"]
    cls = FRAME_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(
            f"unknown frame kind {kind!r}, expected one of {sorted(FRAME_KINDS)} @ $.kind"
        )
    name = cls.__name__
    frame: Frame
    if cls is Batch or cls is Reset:
        try:
            frame = _read_batch(unpacked) if cls is Batch else _read_reset(unpacked)
        except _Invalid as exc:
            raise ProtocolError(f"invalid {name} frame: {exc.reason} @ {exc.path}") from None
    else:
        try:
            frame = _CONVERTER.structure(unpacked, cls)
        except cattrs.BaseValidationError as exc:
            reasons = "; ".join(cattrs.transform_error(exc, format_exception=_format_error))
            raise ProtocolError(f"invalid {name} frame: {reasons}") from exc
        except Exception as exc:  # cattrs raises whatever a hook raised
            raise ProtocolError(f"invalid {name} frame: {exc}") from exc
    problem = _frame_problem(frame, catalog)
    if problem is not None:
        raise ProtocolError(f"invalid {name} frame: {problem}")
    return frame


# -- per-frame rules ----------------------------------------------------------------------


def _cursor_problem(cursor: Cursor | None, path: str) -> str | None:
    if cursor is None:
        return None
    if not cursor.epoch:
        return f"must not be empty @ {path}.epoch"
    if cursor.revision < 0:
        return f"must be >= 0, got {cursor.revision} @ {path}.revision"
    return None


def _type_problem(key: ResourceKey, catalog: Catalog | None, path: str) -> str | None:
    if catalog is None or key.type in catalog:
        return None
    return f"unknown resource type {key.type!r} @ {path}.type"


def _frame_problem(frame: Frame, catalog: Catalog | None) -> str | None:
    """What is wrong with *frame* on its own (not in relation to the session), if anything."""
    if isinstance(frame, Hello):
        if not frame.protocol_versions:
            return "must offer at least one version @ $.protocol_versions"
        if not frame.zone:
            return "must not be empty @ $.zone"
        if frame.max_frame_size < 1:
            return f"must be >= 1, got {frame.max_frame_size} @ $.max_frame_size"
        return _cursor_problem(frame.cursor, "$.cursor")
    if isinstance(frame, Welcome):
        if frame.max_frame_size < 1:
            return f"must be >= 1, got {frame.max_frame_size} @ $.max_frame_size"
        if not (frame.heartbeat_interval > 0 and math.isfinite(frame.heartbeat_interval)):
            interval = frame.heartbeat_interval
            return f"must be a positive number, got {interval} @ $.heartbeat_interval"
        return _cursor_problem(frame.cursor, "$.cursor")
    if isinstance(frame, Batch):
        if not frame.epoch:
            return "must not be empty @ $.epoch"
        previous = 0
        # Paths are built only for an error: this runs for every event received.
        for index, event in enumerate(frame.events):
            if event.revision <= previous:
                return (
                    f"revisions must be strictly increasing and >= 1: {event.revision} "
                    f"follows {previous} @ $.events[{index}].revision"
                )
            previous = event.revision
            if catalog is not None and event.key.type not in catalog:
                return _type_problem(event.key, catalog, f"$.events[{index}]")
        if frame.revision < max(previous, 1):
            return (
                f"must be >= 1 and >= the last event's revision {previous}, "
                f"got {frame.revision} @ $.revision"
            )
        return None
    if isinstance(frame, Reset):
        if not frame.epoch:
            return "must not be empty @ $.epoch"
        if frame.revision < 0:
            return f"must be >= 0, got {frame.revision} @ $.revision"
        if frame.index < 0:
            return f"must be >= 0, got {frame.index} @ $.index"
        seen: set[ResourceKey] = set()
        for index, resource in enumerate(frame.resources):
            key = resource.key
            if key in seen:
                return f"{key} appears twice in the snapshot @ $.resources[{index}]"
            seen.add(key)
            if catalog is not None and key.type not in catalog:
                return _type_problem(key, catalog, f"$.resources[{index}]")
        return None
    if isinstance(frame, Ack | Nack) and frame.revision < 0:
        return f"must be >= 0, got {frame.revision} @ $.revision"
    if isinstance(frame, Nack):
        if not frame.rejected:
            return "must name at least one resource (a NACK of nothing is an ACK) @ $.rejected"
        for index, rejection in enumerate(frame.rejected):
            problem = _type_problem(rejection.key, catalog, f"$.rejected[{index}].key")
            if problem is not None:
                return problem
    return None


# -- negotiation --------------------------------------------------------------------------


def negotiate(
    hello: Hello,
    *,
    versions: Collection[int] = SUPPORTED_VERSIONS,
    features: Collection[str] = FEATURES,
) -> tuple[int, frozenset[str]]:
    """Choose the session's protocol version and features for *hello* (the global side).

    Args:
        hello: the zone's Hello.
        versions: the major versions the global speaks.
        features: the features the global implements.

    Returns:
        The newest version both speak, and the features both implement.

    Raises:
        VersionMismatchError: no version in common; answer with a non-retryable
            :class:`Reject` whose reason is the error's message.
    """
    common = set(hello.protocol_versions) & set(versions)
    if not common:
        raise VersionMismatchError(hello.protocol_versions, tuple(versions))
    return max(common), frozenset(hello.features) & frozenset(features)


# -- chunking -----------------------------------------------------------------------------


def _array_header_size(count: int) -> int:
    # msgpack: fixarray up to 15 elements, array16 up to 65535, then array32.
    if count < 16:
        return 1
    return 3 if count < 2**16 else 5


def _packed_size(
    wire: Callable[[_T], object], describe: Callable[[_T], str]
) -> Callable[[_T], int]:
    """The size of an item encoded as *wire* writes it; a ValueError naming it if it cannot be."""
    pack = msgpack.Packer(use_bin_type=True).pack

    def size(item: _T) -> int:
        try:
            return len(pack(wire(item)))
        except (TypeError, ValueError, OverflowError) as exc:
            # Leaves the packer with a partial item: the caller stops here.
            raise ValueError(f"cannot encode {describe(item)}: {exc}") from exc

    return size


def _runs(
    items: Iterable[_T],
    size_of: Callable[[_T], int],
    envelope: Callable[[int], int],
    max_frame_size: int,
    *,
    describe_alone: Callable[[_T], str],
) -> Iterator[list[_T]]:
    """Split *items* into consecutive runs that each fit in a frame, lazily.

    Each item is sized only when its run is made, and a run is yielded as soon as
    the next item does not fit: a caller sending each run before asking for the
    next holds one frame's items at a time, however many there are (a snapshot of
    the whole store). At least one run: an empty one when there are no items.

    Args:
        items: what the frames carry, in order.
        size_of: an item's size, encoded as the frame's array holds it.
        envelope: the size of frame number *n* (from 0) with an empty array where
            the items go.
        max_frame_size: the limit, in bytes.
        describe_alone: names an item too large for a frame of its own.

    Raises:
        ValueError: an item cannot be encoded (from *size_of*).
        FrameTooLargeError: an item does not fit in a frame of its own.
    """
    number = 0
    empty = envelope(number)
    run: list[_T] = []
    total = 0
    for item in items:
        size = size_of(item)
        if run and empty - 1 + _array_header_size(len(run) + 1) + total + size > max_frame_size:
            yield run
            number += 1
            empty = envelope(number)
            run, total = [], 0
        if not run:
            alone = empty - 1 + _array_header_size(1) + size
            if alone > max_frame_size:
                raise FrameTooLargeError(alone, max_frame_size, what=describe_alone(item))
        run.append(item)
        total += size
    yield run


def batch_frames(
    epoch: str,
    events: Sequence[Event],
    *,
    max_frame_size: int,
    revision: int | None = None,
) -> list[Batch]:
    """Split *events* into Batch frames that each encode to at most *max_frame_size* bytes.

    Frames keep the events' order, and a frame holds as many events as fit. Each
    frame's ``revision`` is its last event's, except the last frame's, which is
    *revision* when given.

    Args:
        epoch: the sender's log epoch.
        events: events with strictly increasing revisions.
        max_frame_size: the limit, in bytes: the smaller of the session's and the
            receiver's (its Hello or Welcome).
        revision: where the receiver stands after the last frame; defaults to the
            last event's revision. With no events, one empty frame moves the
            receiver there (no frame at all when *revision* is ``None`` too).

    Raises:
        FrameTooLargeError: one event alone does not fit in a frame; the message
            names its resource.
        ValueError: revisions are not strictly increasing, *revision* is before the
            last event's or below 1, or an event cannot be encoded.
    """
    for before, after in itertools.pairwise(events):
        if after.revision <= before.revision:
            raise ValueError(
                f"event revisions must increase: {after.revision} follows {before.revision}"
            )
    last = events[-1].revision if events else None
    if revision is None:
        if last is None:
            return []
        revision = last
    if last is not None and revision < last:
        raise ValueError(f"revision {revision} is before the last event's revision {last}")
    if revision < 1:
        raise ValueError(f"revision must be >= 1, got {revision}")
    # The largest revision any chunk carries: msgpack integers never shrink as they grow.
    envelope = len(encode_frame(Batch(epoch=epoch, events=(), revision=revision)))
    runs = list(
        _runs(
            events,
            _packed_size(_wire_event, lambda event: f"the event at revision {event.revision}"),
            lambda _: envelope,
            max_frame_size,
            describe_alone=lambda event: (
                f"{type(event).__name__} event of {event.key} at revision {event.revision} "
                "(a Batch frame holding only it)"
            ),
        )
    )
    frames = []
    for number, run in enumerate(runs):
        is_last = number == len(runs) - 1
        frames.append(
            Batch(
                epoch=epoch,
                events=tuple(run),
                revision=revision if is_last else run[-1].revision,
            )
        )
    return frames


def reset_frames(
    epoch: str,
    revision: int,
    resources: Iterable[Resource],
    *,
    max_frame_size: int,
    packed: Callable[[Resource], bytes] | None = None,
) -> Iterator[Reset]:
    """Split a snapshot into Reset frames that each encode to at most *max_frame_size* bytes.

    Lazily: a frame's resources are taken from *resources* (and encoded to size
    them) only as that frame is made, so a sender that sends each frame before
    asking for the next holds one frame at a time -- *resources* may itself be a
    generator mapping a snapshot for the peer. Always at least one frame (an empty
    snapshot is one empty, final frame); the frames are numbered from 0 and only
    the last is final.

    Args:
        epoch: the sender's log epoch.
        revision: the revision the snapshot is consistent with.
        resources: the snapshot's resources, each key once.
        max_frame_size: the limit, in bytes (see :func:`batch_frames`).
        packed: a resource's row as :func:`pack_resource` encodes it, when the
            caller keeps them (to encode the frames with :func:`encode_reset`).

    Raises:
        FrameTooLargeError: one resource alone does not fit in a frame; the
            message names it. Raised when its frame is reached: the frames
            before it may have been sent.
        ValueError: a key appears twice, or a resource cannot be encoded (also
            when reached).
    """
    seen: set[ResourceKey] = set()

    def unique(resources: Iterable[Resource]) -> Iterator[Resource]:
        for resource in resources:
            if resource.key in seen:
                raise ValueError(f"{resource.key} appears twice in the snapshot")
            seen.add(resource.key)
            yield resource

    def envelope(index: int) -> int:
        # Sized as the final frame: `final` encodes to one byte either way.
        return len(
            encode_frame(
                Reset(epoch=epoch, revision=revision, index=index, resources=(), final=True)
            )
        )

    size_of: Callable[[Resource], int]
    if packed is None:
        size_of = _packed_size(_wire_resource, lambda resource: f"resource {resource.key}")
    else:
        size_of = lambda resource: len(packed(resource))  # noqa: E731 -- one line either way
    runs = _runs(
        unique(resources),
        size_of,
        envelope,
        max_frame_size,
        describe_alone=lambda resource: f"resource {resource.key} (a Reset frame holding only it)",
    )
    # One run ahead: a frame is final when no run follows it.
    number, run = 0, next(runs)
    for following in runs:
        yield Reset(epoch=epoch, revision=revision, index=number, resources=tuple(run), final=False)
        number, run = number + 1, following
    yield Reset(epoch=epoch, revision=revision, index=number, resources=tuple(run), final=True)


# -- frame order --------------------------------------------------------------------------


class Role(enum.Enum):
    """Which end of a session a :class:`ProtocolChecker` runs on."""

    ZONE = "zone"
    """The zone: it dials, sends Hello and receives Welcome or Reject."""
    GLOBAL = "global"
    """The global: it listens, receives Hello and answers Welcome or Reject."""


class _Violation(Exception):
    """A frame that is not allowed now; the checker turns it into the right error."""


@attrs.define
class _Unacked:
    revision: int
    keys: frozenset[ResourceKey]


@attrs.define
class _ResetInProgress:
    epoch: str
    revision: int
    next_index: int
    keys: set[ResourceKey]


class _Stream:
    """One direction's replication stream, as frames travel along it.

    Fed the Batch and Reset frames in the order they travel and the ACK/NACK
    frames that come back, it checks the ordering rules; both ends of a stream use
    it (the sender for the frames it sends, the receiver for those it receives).
    """

    def __init__(self, cursor: Cursor | None) -> None:
        self.epoch = cursor.epoch if cursor is not None else None
        self.position = cursor.revision if cursor is not None else 0
        self.reset: _ResetInProgress | None = None
        self.unacked: deque[_Unacked] = deque()

    @property
    def cursor(self) -> Cursor | None:
        return Cursor(self.epoch, self.position) if self.epoch is not None else None

    def batch(self, frame: Batch) -> None:
        if self.reset is not None:
            raise _Violation(
                f"a Batch arrived in the middle of the reset to revision {self.reset.revision}; "
                f"expected its chunk {self.reset.next_index}"
            )
        if self.epoch is None:
            raise _Violation("a Batch arrived before any Reset: the receiver has no cursor yet")
        if frame.epoch != self.epoch:
            raise _Violation(
                f"a Batch of log epoch {frame.epoch!r} arrived while the stream is in epoch "
                f"{self.epoch!r}: a new epoch must start with a Reset"
            )
        first = frame.events[0].revision if frame.events else frame.revision
        if first <= self.position:
            raise _Violation(
                f"a Batch starting at revision {first} arrived, but the stream is already at "
                f"revision {self.position}: revisions must keep increasing"
            )
        self.position = frame.revision
        self.unacked.append(_Unacked(frame.revision, frozenset(e.key for e in frame.events)))

    def reset_chunk(self, frame: Reset) -> None:
        progress = self.reset
        if progress is None:
            if frame.index != 0:
                raise _Violation(f"Reset chunk {frame.index} arrived before chunk 0")
            progress = _ResetInProgress(frame.epoch, frame.revision, 0, set())
        elif (frame.epoch, frame.revision) != (progress.epoch, progress.revision):
            raise _Violation(
                f"a Reset chunk of the snapshot at {frame.epoch!r}/{frame.revision} arrived in "
                f"the middle of the snapshot at {progress.epoch!r}/{progress.revision}"
            )
        elif frame.index != progress.next_index:
            raise _Violation(
                f"Reset chunk {frame.index} arrived, expected chunk {progress.next_index}"
            )
        keys = {resource.key for resource in frame.resources}
        repeated = keys & progress.keys
        if repeated:
            raise _Violation(f"{min(repeated)} appears in two chunks of the snapshot")
        progress.keys |= keys
        progress.next_index += 1
        if frame.final:
            self.reset = None
            self.epoch, self.position = frame.epoch, frame.revision
            self.unacked.append(_Unacked(frame.revision, frozenset(progress.keys)))
        else:
            self.reset = progress

    def acknowledge(self, frame: Ack | Nack) -> None:
        name = "an ACK" if isinstance(frame, Ack) else "a NACK"
        if not self.unacked:
            raise _Violation(
                f"{name} of revision {frame.revision} arrived, but no batch awaits one"
            )
        oldest = self.unacked[0]
        if frame.revision != oldest.revision:
            raise _Violation(
                f"{name} of revision {frame.revision} arrived, but the oldest batch awaiting "
                f"one is at revision {oldest.revision}"
            )
        if isinstance(frame, Nack):
            for rejection in frame.rejected:
                if rejection.key not in oldest.keys:
                    raise _Violation(
                        f"a NACK of revision {frame.revision} rejects {rejection.key}, which "
                        "that batch did not carry"
                    )
        self.unacked.popleft()


class ProtocolChecker:
    """Validates the order of the frames one end of a session sends and receives.

    A pure state machine: feed it every frame, :meth:`sent` before sending one and
    :meth:`received` after decoding one and *before* acting on it, so that an
    out-of-order frame never reaches the store. It enforces:

    * the handshake: the zone sends Hello first and nothing else until the global
      answers Welcome (the session version and features being ones the zone
      offered) or Reject; nothing follows a Reject or a Goodbye;
    * each replication stream: a stream starts at the cursor exchanged in the
      handshake (the zone's in Hello for the global's stream, the global's in
      Welcome for the zone's); batches stay in the stream's epoch with revisions
      after its position; a new epoch or a missing cursor needs a Reset, whose
      chunks run from 0 to the final one without batches in between;
    * acknowledgements: exactly one ACK or NACK per batch (and per completed
      reset), in order, naming only resources that batch carried;
    * heartbeats: a Pong answers a Ping that was sent and not yet answered.

    Args:
        role: which end this checker runs on.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._hello: Hello | None = None
        self._welcome: Welcome | None = None
        self._ended_by_us = False
        self._ended_by_peer = False
        self._inbound: _Stream | None = None
        self._outbound: _Stream | None = None
        self._pings_sent: set[int] = set()
        self._pings_received: deque[int] = deque()

    @property
    def hello(self) -> Hello | None:
        """The session's Hello, once sent (zone) or received (global)."""
        return self._hello

    @property
    def welcome(self) -> Welcome | None:
        """The session's Welcome, once the handshake completed."""
        return self._welcome

    @property
    def established(self) -> bool:
        """Whether the handshake completed with a Welcome."""
        return self._welcome is not None

    @property
    def ended(self) -> bool:
        """Whether either side ended the session (Goodbye, or Reject)."""
        return self._ended_by_us or self._ended_by_peer

    @property
    def inbound(self) -> Cursor | None:
        """Where the stream this side receives stands after the last frame received.

        ``None`` until the stream has a cursor: before the handshake, or when the
        handshake carried none and no Reset has completed.
        """
        return self._inbound.cursor if self._inbound is not None else None

    @property
    def outbound(self) -> Cursor | None:
        """Where the stream this side sends stands after the last frame sent."""
        return self._outbound.cursor if self._outbound is not None else None

    @property
    def unacked(self) -> int:
        """How many batches (and completed resets) this side sent that await an ACK or NACK."""
        return len(self._outbound.unacked) if self._outbound is not None else 0

    def sent(self, frame: Frame) -> None:
        """Record that this side is sending *frame*; call it before sending.

        Raises:
            ValueError: *frame* is malformed or not allowed now (a bug on this
                side); the checker's state is unchanged.
        """
        try:
            problem = _frame_problem(frame, None)
            if problem is not None:
                raise _Violation(f"malformed: {problem}")
            self._apply(frame, sending=True)
        except _Violation as exc:
            raise ValueError(f"cannot send a {type(frame).__name__} frame now: {exc}") from None

    def received(self, frame: Frame) -> None:
        """Record that *frame* arrived from the peer; call it before acting on it.

        Raises:
            ProtocolError: the peer sent *frame* out of order; end the session
                (after a :class:`Goodbye` with :attr:`GoodbyeCode.PROTOCOL_ERROR`).
                The checker's state is unchanged.
        """
        try:
            # decode_frame checked this already; frames may also come from elsewhere.
            problem = _frame_problem(frame, None)
            if problem is not None:
                raise _Violation(f"malformed: {problem}")
            self._apply(frame, sending=False)
        except _Violation as exc:
            peer = "global" if self.role is Role.ZONE else "zone"
            raise ProtocolError(
                f"the {peer} sent a {type(frame).__name__} frame out of order: {exc}"
            ) from None

    def _apply(self, frame: Frame, *, sending: bool) -> None:
        if self._ended_by_us if sending else self._ended_by_peer:
            raise _Violation("the sender already ended the session")
        if isinstance(frame, Goodbye):
            if sending:
                self._ended_by_us = True
            else:
                self._ended_by_peer = True
            return
        if self._welcome is None:
            self._handshake(frame, sending=sending)
            return
        if isinstance(frame, Hello | Welcome | Reject):
            raise _Violation("the handshake is already complete")
        # The stream this side sends carries our Batch/Reset frames and the peer's
        # ACK/NACKs; the stream it receives, the reverse.
        outbound, inbound = self._outbound, self._inbound
        assert outbound is not None  # noqa: S101  # both are set with _welcome
        assert inbound is not None  # noqa: S101
        if isinstance(frame, Batch):
            (outbound if sending else inbound).batch(frame)
        elif isinstance(frame, Reset):
            (outbound if sending else inbound).reset_chunk(frame)
        elif isinstance(frame, Ack | Nack):
            (inbound if sending else outbound).acknowledge(frame)
        elif isinstance(frame, Ping):
            self._ping(frame, sending=sending)
        else:
            self._pong(frame, sending=sending)

    def _handshake(self, frame: Frame, *, sending: bool) -> None:
        # Who may send what before the Welcome: the zone sends Hello, the global
        # answers; the zone speaks first.
        zone_speaking = sending == (self.role is Role.ZONE)
        if zone_speaking:
            if self._hello is not None:
                raise _Violation("the zone must wait for Welcome or Reject after its Hello")
            if not isinstance(frame, Hello):
                raise _Violation("the zone's first frame must be Hello")
            self._hello = frame
            return
        if self._hello is None:
            raise _Violation("the global must wait for the zone's Hello")
        if isinstance(frame, Reject):
            if sending:
                self._ended_by_us = True
            else:
                self._ended_by_peer = True
            return
        if not isinstance(frame, Welcome):
            raise _Violation("the global's first frame must be Welcome or Reject")
        if frame.protocol_version not in self._hello.protocol_versions:
            raise _Violation(
                f"Welcome chose protocol version {frame.protocol_version}, which the zone "
                f"did not offer ({list(self._hello.protocol_versions)})"
            )
        extra = frame.features - self._hello.features
        if extra:
            raise _Violation(f"Welcome enables features the zone did not offer: {sorted(extra)}")
        self._welcome = frame
        global_stream, zone_stream = _Stream(self._hello.cursor), _Stream(frame.cursor)
        if self.role is Role.ZONE:
            self._inbound, self._outbound = global_stream, zone_stream
        else:
            self._inbound, self._outbound = zone_stream, global_stream

    def _ping(self, frame: Ping, *, sending: bool) -> None:
        if not sending:
            self._pings_received.append(frame.nonce)
        elif frame.nonce in self._pings_sent:
            raise _Violation(f"a Ping with nonce {frame.nonce} is still unanswered")
        else:
            self._pings_sent.add(frame.nonce)

    def _pong(self, frame: Pong, *, sending: bool) -> None:
        if sending:
            if frame.nonce not in self._pings_received:
                raise _Violation(f"no Ping with nonce {frame.nonce} awaits a Pong")
            self._pings_received.remove(frame.nonce)
        elif frame.nonce not in self._pings_sent:
            raise _Violation(f"no Ping with nonce {frame.nonce} was sent")
        else:
            self._pings_sent.discard(frame.nonce)
