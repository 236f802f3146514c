from __future__ import annotations

import contextlib
import itertools
from datetime import UTC, datetime
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kds import (
    Catalog,
    Cursor,
    DecodeError,
    Deleted,
    FrameTooLargeError,
    ProtocolError,
    Resource,
    ResourceKey,
    ResourceType,
    Scope,
    Upserted,
    VersionMismatchError,
)
from kds.codec import strict_converter
from kds.protocol import (
    FEATURES,
    FRAME_KINDS,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Ack,
    Batch,
    Goodbye,
    GoodbyeCode,
    Hello,
    Nack,
    Ping,
    Pong,
    ProtocolChecker,
    Reject,
    Rejection,
    Reset,
    Role,
    Welcome,
    batch_frames,
    decode_frame,
    encode_frame,
    encode_reset,
    negotiate,
    pack_resource,
    reset_frames,
)
from kds.testing.strategies import EPOCHS, TYPES, labels, msgpack_values, resource_keys, specs

NOW = datetime(2026, 11, 25, 12, 30, 15, 123456, tzinfo=UTC)

# -- strategies ------------------------------------------------------------------------------

epochs = st.sampled_from(EPOCHS)
cursors = st.none() | st.builds(Cursor, epochs, st.integers(0, 2**40))
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
words = st.text(max_size=12)
feature_sets = st.frozensets(st.sampled_from(["hash-suffix", "zstd", "x-future", "a"]), max_size=3)
type_sets = st.frozensets(st.sampled_from(TYPES), max_size=len(TYPES))


@st.composite
def resources(draw, keys=None):
    key = draw(keys if keys is not None else resource_keys())
    return Resource(
        key=key,
        labels=draw(labels()),
        spec=draw(specs(key.type)),
        version=draw(st.integers(1, 2**40)),
        created_at=draw(timestamps),
        modified_at=draw(timestamps),
    )


@st.composite
def events_at(draw, revision):
    if draw(st.booleans()):
        return Upserted(revision=revision, resource=draw(resources()))
    return Deleted(
        revision=revision,
        key=draw(resource_keys()),
        version=draw(st.integers(1, 2**40)),
        labels=draw(labels()),
    )


@st.composite
def event_lists(draw, *, after=0, max_size=6):
    revisions = draw(
        st.lists(st.integers(after + 1, after + 10**6), max_size=max_size, unique=True)
    )
    return tuple(draw(events_at(revision)) for revision in sorted(revisions))


hellos = st.builds(
    Hello,
    protocol_versions=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    zone=st.text(min_size=1, max_size=12),
    credentials=st.none() | words,
    features=feature_sets,
    cursor=cursors,
    max_frame_size=st.integers(1, 2**32),
    types=type_sets,
    instance_id=words,
    software_version=words,
)
welcomes = st.builds(
    Welcome,
    protocol_version=st.integers(1, 5),
    features=feature_sets,
    instance_id=words,
    cursor=cursors,
    max_frame_size=st.integers(1, 2**32),
    types=type_sets,
    heartbeat_interval=st.floats(min_value=0.001, max_value=1e6),
    software_version=words,
)
rejects = st.builds(Reject, reason=words, retryable=st.booleans())


@st.composite
def batches(draw):
    events = draw(event_lists())
    last = events[-1].revision if events else 1
    revision = draw(st.integers(last, last + 100))
    return Batch(epoch=draw(epochs), events=events, revision=revision)


resets = st.builds(
    Reset,
    epoch=epochs,
    revision=st.integers(0, 2**40),
    index=st.integers(0, 1000),
    resources=st.lists(resources(), max_size=4, unique_by=lambda r: r.key).map(tuple),
    final=st.booleans(),
)
acks = st.builds(Ack, revision=st.integers(0, 2**40))
rejections = st.builds(Rejection, resource_keys(), words)
nacks = st.builds(
    Nack,
    revision=st.integers(0, 2**40),
    rejected=st.lists(rejections, min_size=1, max_size=3).map(tuple),
)
nonces = st.integers(-(2**63), 2**64 - 1)
pings = st.builds(Ping, nonce=nonces)
pongs = st.builds(Pong, nonce=nonces)
goodbyes = st.builds(Goodbye, code=st.sampled_from(list(GoodbyeCode)) | words, reason=words)

FRAMES_BY_KIND = {
    "hello": hellos,
    "welcome": welcomes,
    "reject": rejects,
    "batch": batches(),
    "reset": resets,
    "ack": acks,
    "nack": nacks,
    "ping": pings,
    "pong": pongs,
    "goodbye": goodbyes,
}
frames = st.one_of(*FRAMES_BY_KIND.values())


def test_every_frame_kind_has_a_strategy():
    assert set(FRAMES_BY_KIND) == set(FRAME_KINDS)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FRAMES_BY_KIND))
@given(data=st.data())
def test_every_frame_kind_round_trips(kind, data):
    frame = data.draw(FRAMES_BY_KIND[kind])
    encoded = encode_frame(frame)
    assert msgpack.unpackb(encoded)["kind"] == kind
    decoded = decode_frame(encoded)
    assert decoded == frame
    assert type(decoded) is type(frame)
    # Equal frames encode to equal bytes (sets are sorted).
    assert encode_frame(decoded) == encoded


def test_timestamps_and_event_kinds_survive_a_batch():
    resource = Resource(
        key=ResourceKey("Dataplane", "default", "dp-1"),
        labels={"kuma.io/zone": "zone-1"},
        spec={"networking": {"port": 1}},
        version=4,
        created_at=NOW,
        modified_at=NOW,
    )
    batch = Batch(
        epoch="e",
        events=(
            Upserted(revision=3, resource=resource),
            Deleted(revision=5, key=resource.key, version=4, labels={}),
        ),
        revision=9,
    )
    decoded = decode_frame(encode_frame(batch))
    assert decoded == batch
    assert isinstance(decoded, Batch)
    assert [type(event) for event in decoded.events] == [Upserted, Deleted]
    first = decoded.events[0]
    assert isinstance(first, Upserted)
    assert first.resource.modified_at == NOW


def test_credentials_are_not_shown_in_repr():
    hello = Hello(
        protocol_versions=(1,),
        zone="zone-1",
        credentials="secret-token",
        features=frozenset(),
        cursor=None,
        max_frame_size=1024,
        types=frozenset(),
        instance_id="i",
        software_version="v",
    )
    assert "secret-token" not in repr(hello)


# -- decoding: strictness and forward compatibility ---------------------------------------------


def _wire(frame):
    return msgpack.unpackb(encode_frame(frame))


def _decode(data):
    return decode_frame(msgpack.packb(data, use_bin_type=True))


BATCH = Batch(
    epoch="e",
    events=tuple(
        Deleted(
            revision=revision, key=ResourceKey("Mesh", None, f"m{revision}"), version=1, labels={}
        )
        for revision in range(1, 6)
    ),
    revision=5,
)
UPSERTS = Batch(
    epoch="e",
    events=tuple(
        Upserted(
            revision=revision,
            resource=Resource(
                key=ResourceKey("MeshTimeout", "default", f"t{revision}"),
                labels={"team": "a"},
                spec={"x": revision},
                version=revision,
                created_at=NOW,
                modified_at=NOW,
            ),
        )
        for revision in range(1, 4)
    ),
    revision=3,
)
RESET = Reset(
    epoch="e",
    revision=3,
    index=0,
    resources=tuple(event.resource for event in UPSERTS.events if isinstance(event, Upserted)),
    final=True,
)
HELLO = Hello(
    protocol_versions=(1,),
    zone="zone-1",
    credentials=None,
    features=frozenset({"a"}),
    cursor=Cursor("e", 3),
    max_frame_size=1024,
    types=frozenset({"Mesh"}),
    instance_id="zone-1-a",
    software_version="0.1.0",
)


def _with(frame, path, value):
    data = _wire(frame)
    target = data
    for step in path[:-1]:
        target = target[step]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()

# The row layouts docs/protocol.md specifies, written out here rather than taken from
# kds.protocol so that the tests pin the wire format down.
UPSERTED_ROW = (
    "kind",
    "revision",
    "type",
    "mesh",
    "name",
    "labels",
    "spec",
    "version",
    "created_at",
    "modified_at",
)
DELETED_ROW = ("kind", "revision", "type", "mesh", "name", "labels", "version")
RESOURCE_ROW = ("type", "mesh", "name", "labels", "spec", "version", "created_at", "modified_at")


def _rows(frame):
    """The name of the array of rows in *frame*, and the layout of a *row* in it."""
    if isinstance(frame, Reset):
        return "resources", lambda row: RESOURCE_ROW
    return "events", lambda row: UPSERTED_ROW if row[0] == 0 else DELETED_ROW


def _row_with(frame, index, field, value):
    """*frame*'s wire form with the element *field* of row *index* replaced by *value*.

    ``_DELETE`` cuts the row short just before *field*.
    """
    data = _wire(frame)
    items, layout = _rows(frame)
    row = data[items][index]
    position = layout(row).index(field)
    if value is _DELETE:
        del row[position:]
    else:
        row[position] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _row_with(BATCH, 3, "revision", "4"),
            r"Batch frame: expected an integer, got str @ \$\.events\[3\]\.revision$",
        ),
        (
            _row_with(BATCH, 3, "revision", True),
            r"expected an integer, got bool @ \$\.events\[3\]\.revision$",
        ),
        (
            _row_with(BATCH, 2, "kind", 7),
            r"unknown event kind 7, expected 0 \(upserted\) or 1 \(deleted\) "
            r"@ \$\.events\[2\]\.kind$",
        ),
        (
            _row_with(BATCH, 2, "kind", "deleted"),
            r"expected an integer, got str @ \$\.events\[2\]\.kind$",
        ),
        (
            _row_with(BATCH, 2, "kind", True),
            r"expected an integer, got bool @ \$\.events\[2\]\.kind$",
        ),
        (
            _row_with(BATCH, 2, "kind", _DELETE),
            r"required field missing: the row is empty @ \$\.events\[2\]\.kind$",
        ),
        (
            _row_with(BATCH, 1, "name", _DELETE),
            r"required field missing: a deleted event has 7 elements, got 4 "
            r"@ \$\.events\[1\]\.name$",
        ),
        (
            _row_with(BATCH, 1, "type", None),
            r"expected a string, got NoneType @ \$\.events\[1\]\.type$",
        ),
        (
            _row_with(BATCH, 1, "mesh", 5),
            r"expected a string or nil, got int @ \$\.events\[1\]\.mesh$",
        ),
        (
            _row_with(BATCH, 0, "labels", {"a": 1}),
            r"expected a string, got int @ \$\.events\[0\]\.labels\['a'\]$",
        ),
        (
            _row_with(BATCH, 0, "labels", {b"a": "b"}),
            r"expected string keys, got bytes @ \$\.events\[0\]\.labels$",
        ),
        (
            _row_with(BATCH, 0, "labels", [["a", "b"]]),
            r"expected a map, got list @ \$\.events\[0\]\.labels$",
        ),
        (
            _row_with(BATCH, 4, "version", 1.0),
            r"expected an integer, got float @ \$\.events\[4\]\.version$",
        ),
        (
            _row_with(UPSERTS, 1, "spec", []),
            r"expected a map, got list @ \$\.events\[1\]\.spec$",
        ),
        (
            _row_with(UPSERTS, 1, "version", _DELETE),
            r"required field missing: an upserted event has 10 elements, got 7 "
            r"@ \$\.events\[1\]\.version$",
        ),
        (
            _row_with(UPSERTS, 0, "created_at", "2026-11-25T12:30:15Z"),
            r"expected a timestamp, got str @ \$\.events\[0\]\.created_at$",
        ),
        (
            _row_with(UPSERTS, 0, "modified_at", False),
            r"expected a timestamp, got bool @ \$\.events\[0\]\.modified_at$",
        ),
        (
            _row_with(UPSERTS, 2, "modified_at", 1e300),
            r"timestamp out of range: 1e\+300 @ \$\.events\[2\]\.modified_at$",
        ),
        (
            _row_with(UPSERTS, 2, "created_at", float("nan")),
            r"timestamp out of range: nan @ \$\.events\[2\]\.created_at$",
        ),
        (_with(BATCH, ["events"], "abc"), r"expected an array, got str @ \$\.events$"),
        (_with(BATCH, ["events"], {"a": 1}), r"expected an array, got dict @ \$\.events$"),
        (_with(BATCH, ["events", 0], 7), r"expected an array, got int @ \$\.events\[0\]$"),
        (
            # An event as a map (the shape kds.Codec gives it) is not a row.
            _with(BATCH, ["events", 0], {"kind": "deleted", "revision": 1}),
            r"expected an array, got dict @ \$\.events\[0\]$",
        ),
        (_with(BATCH, ["revision"], _DELETE), r"required field missing @ \$\.revision$"),
        (_with(BATCH, ["epoch"], 5), r"Batch frame: expected a string, got int @ \$\.epoch$"),
        (_with(RESET, ["final"], _DELETE), r"Reset frame: required field missing @ \$\.final$"),
        (_with(RESET, ["final"], 1), r"expected a boolean, got int @ \$\.final$"),
        (_with(RESET, ["index"], "0"), r"expected an integer, got str @ \$\.index$"),
        (_with(RESET, ["resources"], {}), r"expected an array, got dict @ \$\.resources$"),
        (
            _row_with(RESET, 1, "type", 5),
            r"Reset frame: expected a string, got int @ \$\.resources\[1\]\.type$",
        ),
        (
            _row_with(RESET, 0, "modified_at", _DELETE),
            r"required field missing: a resource has 8 elements, got 7 "
            r"@ \$\.resources\[0\]\.modified_at$",
        ),
        (
            _row_with(RESET, 1, "type", "NoSuchType"),
            r"unknown resource type 'NoSuchType' @ \$\.resources\[1\]\.type$",
        ),
        (_with(HELLO, ["zone"], _DELETE), r"Hello frame: required field missing @ \$\.zone"),
        (_with(HELLO, ["features"], "ab"), r"expected an array, got str @ \$\.features"),
        (_with(HELLO, ["features"], ["a", 1]), r"expected a string, got int @ \$\.features\[1\]"),
        (_with(HELLO, ["cursor"], "e:3"), r"expected a map, got str @ \$\.cursor"),
        (
            _with(HELLO, ["cursor", "revision"], _DELETE),
            r"required field missing @ \$\.cursor\.revision",
        ),
        (_with(HELLO, ["credentials"], 5), r"expected a string, got int @ \$\.credentials"),
        (_with(HELLO, ["protocol_versions"], []), r"at least one version @ \$\.protocol_versions"),
        (_with(HELLO, ["zone"], ""), r"must not be empty @ \$\.zone"),
        (_with(HELLO, ["max_frame_size"], 0), r"must be >= 1, got 0 @ \$\.max_frame_size"),
        (_with(HELLO, ["cursor", "revision"], -1), r"must be >= 0, got -1 @ \$\.cursor\.revision"),
        (_with(HELLO, ["cursor", "epoch"], ""), r"must not be empty @ \$\.cursor\.epoch"),
        (
            _row_with(BATCH, 3, "revision", 3),
            r"strictly increasing.* 3 follows 3 @ \$\.events\[3\]\.revision",
        ),
        (
            _row_with(BATCH, 0, "revision", 0),
            r"strictly increasing and >= 1.* @ \$\.events\[0\]\.revision",
        ),
        (_with(BATCH, ["revision"], 4), r">= the last event's revision 5, got 4 @ \$\.revision"),
        (_with(BATCH, ["events"], []) | {"revision": 0}, r"must be >= 1 .* got 0 @ \$\.revision"),
        (_with(BATCH, ["epoch"], ""), r"must not be empty @ \$\.epoch"),
        (
            _row_with(BATCH, 4, "type", "NoSuchType"),
            r"unknown resource type 'NoSuchType' @ \$\.events\[4\]\.type$",
        ),
        (
            {"kind": "nack", "revision": 1, "rejected": []},
            r"at least one resource .* @ \$\.rejected",
        ),
        ({"kind": "ack", "revision": -1}, r"must be >= 0, got -1 @ \$\.revision"),
        ({"kind": "ping"}, r"Ping frame: required field missing @ \$\.nonce"),
        (
            {"kind": "goodbye", "code": None, "reason": ""},
            r"expected a string, got NoneType @ \$\.code",
        ),
        ({"kind": "teleport"}, r"unknown frame kind 'teleport'.* @ \$\.kind"),
        ({"kind": 3}, r"unknown frame kind 3, .* @ \$\.kind"),
        ({"revision": 3}, r"required field missing @ \$\.kind"),
        ([1, 2], r"expected a map, got list @ \$"),
    ],
)
def test_bad_frames_are_protocol_errors_naming_the_field(data, message):
    with pytest.raises(ProtocolError, match=message):
        _decode(data)


def test_welcome_needs_a_positive_finite_heartbeat():
    welcome = _wire(
        Welcome(
            protocol_version=1,
            features=frozenset(),
            instance_id="g",
            cursor=None,
            max_frame_size=10,
            types=frozenset(),
            heartbeat_interval=1.0,
            software_version="",
        )
    )
    for bad in (0, -1.5, float("inf"), float("nan")):
        with pytest.raises(ProtocolError, match=r"positive number.* @ \$\.heartbeat_interval"):
            _decode({**welcome, "heartbeat_interval": bad})


def test_a_snapshot_chunk_repeating_a_key_is_refused():
    resource = Resource(
        key=ResourceKey("Mesh", None, "m"),
        labels={},
        spec={},
        version=1,
        created_at=NOW,
        modified_at=NOW,
    )
    data = _wire(Reset(epoch="e", revision=1, index=0, resources=(resource,), final=True))
    data["resources"] = [data["resources"][0], data["resources"][0]]
    with pytest.raises(ProtocolError, match=r"Mesh/m appears twice .* @ \$\.resources\[1\]$"):
        _decode(data)


def test_truncated_trailing_and_non_bytes_input():
    data = encode_frame(BATCH)
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_frame(data[:-1])
    with pytest.raises(ProtocolError, match="trailing bytes"):
        decode_frame(data + b"\x00")
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_frame(b"")
    with pytest.raises(DecodeError, match="expected bytes"):
        decode_frame("text")  # type: ignore[arg-type]


def test_a_catalog_without_the_type_refuses_the_frame():
    only_zones = Catalog.of([ResourceType(name="Zone", scope=Scope.GLOBAL)])
    with pytest.raises(
        ProtocolError, match=r"unknown resource type 'Mesh' @ \$\.events\[0\]\.type$"
    ):
        decode_frame(encode_frame(BATCH), catalog=only_zones)


def test_resource_contents_are_left_to_the_receiver():
    # An invalid spec or label name is NACKed per resource by the receiver, so one
    # bad resource does not make the whole frame (and session) fail.
    resource = Resource(
        key=ResourceKey("Zone", None, "z"),
        labels={"": "empty name"},
        spec={"enabled": "not a boolean"},
        version=1,
        created_at=NOW,
        modified_at=NOW,
    )
    batch = Batch(epoch="e", events=(Upserted(revision=1, resource=resource),), revision=1)
    assert decode_frame(encode_frame(batch)) == batch


extra_keys = st.dictionaries(
    st.text(min_size=1, max_size=6).map(lambda k: "x-" + k), msgpack_values(), max_size=3
)


extra_elements = st.lists(msgpack_values(), max_size=3)


@given(frame=frames, extra=extra_keys, nested_extra=extra_keys, trailing=extra_elements)
def test_unknown_extra_keys_and_trailing_row_elements_are_ignored(
    frame, extra, nested_extra, trailing
):
    data = {**_wire(frame), **extra}
    # A newer peer may add keys inside nested maps too, and elements at the end of rows.
    for value in data.values():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    item.update(nested_extra)
                elif isinstance(item, list):
                    item.extend(trailing)
        elif isinstance(value, dict):
            value.update(nested_extra)
    assert _decode(data) == frame


@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_protocol_errors(data):
    with contextlib.suppress(ProtocolError):
        decode_frame(data)


@given(value=msgpack_values(max_leaves=20))
def test_arbitrary_msgpack_values_raise_only_protocol_errors(value):
    with contextlib.suppress(ProtocolError):
        _decode(value)


@given(
    kind=st.sampled_from(sorted(FRAME_KINDS)),
    fields=st.dictionaries(
        st.sampled_from(
            sorted({field.name for cls in FRAME_KINDS.values() for field in attrs.fields(cls)})
        ),
        msgpack_values(),
    ),
)
def test_any_kind_with_arbitrary_fields_decodes_or_raises_protocol_error(kind, fields):
    with contextlib.suppress(ProtocolError):
        frame = _decode({"kind": kind, **fields})
        assert frame.kind == kind


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@given(frame=frames, data=st.data(), replacement=msgpack_values())
def test_any_field_replaced_by_anything_decodes_or_raises_protocol_error(frame, data, replacement):
    wire = _wire(frame)
    paths = [path for path in _paths(wire) if path and path != ("kind",)]
    assume(paths)
    path = data.draw(st.sampled_from(paths))
    target = wire
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = replacement
    try:
        decoded = _decode(wire)
    except ProtocolError:
        return
    # Whatever is accepted re-encodes: it is a well-formed frame.
    assert decode_frame(encode_frame(decoded)) == decoded


# -- negotiation ------------------------------------------------------------------------------


def test_this_version_and_features():
    assert PROTOCOL_VERSION in SUPPORTED_VERSIONS
    assert isinstance(FEATURES, frozenset)


def test_negotiation_picks_the_newest_common_version_and_common_features():
    hello = attrs.evolve(HELLO, protocol_versions=(1, 2, 3), features=frozenset({"a", "b", "new"}))
    assert negotiate(hello, versions=(1, 2), features={"a", "b", "old"}) == (
        2,
        frozenset({"a", "b"}),
    )
    assert negotiate(attrs.evolve(HELLO, features=frozenset())) == (PROTOCOL_VERSION, frozenset())


def test_negotiation_without_a_common_version_explains_what_to_upgrade():
    with pytest.raises(
        VersionMismatchError, match=r"zone speaks \[2, 3\].*global speaks \[1\]; upgrade the global"
    ) as caught:
        negotiate(attrs.evolve(HELLO, protocol_versions=(3, 2)), versions=(1,))
    assert caught.value.offered == (3, 2)
    assert caught.value.supported == (1,)
    assert isinstance(caught.value, ProtocolError)
    with pytest.raises(VersionMismatchError, match="upgrade the zone"):
        negotiate(attrs.evolve(HELLO, protocol_versions=(1,)), versions=(2,))


# -- chunking -------------------------------------------------------------------------------


def _single_event_frame_size(epoch, event, revision):
    return len(encode_frame(Batch(epoch=epoch, events=(event,), revision=revision)))


@given(
    epoch=epochs,
    events=event_lists(max_size=12),
    extra_revision=st.integers(0, 2**40),
    slack=st.integers(0, 1500),
)
def test_batch_frames_keep_order_and_fit_the_limit(epoch, events, extra_revision, slack):
    last = events[-1].revision if events else 0
    revision = last + extra_revision
    assume(revision >= 1)
    needed = max(
        [_single_event_frame_size(epoch, event, revision) for event in events]
        + [len(encode_frame(Batch(epoch=epoch, events=(), revision=revision)))]
    )
    limit = needed + slack
    chunks = batch_frames(epoch, events, max_frame_size=limit, revision=revision)
    assert chunks
    assert [event for chunk in chunks for event in chunk.events] == list(events)
    assert all(chunk.events for chunk in chunks[:-1])
    for chunk in chunks:
        assert chunk.epoch == epoch
        assert len(encode_frame(chunk)) <= limit
        assert decode_frame(encode_frame(chunk)) == chunk
    assert chunks[-1].revision == revision
    for chunk in chunks[:-1]:
        assert chunk.revision == chunk.events[-1].revision
    # The frames form a valid stream for a receiver standing before the first event.
    checker = _established(Role.ZONE, zone_cursor=Cursor(epoch, 0))
    for chunk in chunks:
        checker.received(chunk)
    assert checker.inbound == Cursor(epoch, revision)


def test_batch_frames_have_no_count_ceiling_and_fill_frames():
    events = [
        Deleted(
            revision=revision, key=ResourceKey("Mesh", None, f"m-{revision}"), version=1, labels={}
        )
        for revision in range(1, 2001)
    ]
    assert len(batch_frames("e", events, max_frame_size=4 * 1024 * 1024)) == 1
    limit = 4096
    chunks = batch_frames("e", events, max_frame_size=limit)
    assert len(chunks) > 1
    # Greedy: adding the next event to a frame would have broken the limit.
    for chunk, following in itertools.pairwise(chunks):
        bigger = attrs.evolve(chunk, events=(*chunk.events, following.events[0]))
        assert len(encode_frame(bigger)) > limit - 16


def test_batch_frames_without_events():
    assert batch_frames("e", [], max_frame_size=100) == []
    assert batch_frames("e", [], max_frame_size=100, revision=7) == [
        Batch(epoch="e", events=(), revision=7)
    ]
    with pytest.raises(ValueError, match="revision must be >= 1"):
        batch_frames("e", [], max_frame_size=100, revision=0)


def test_batch_frames_refuse_unordered_events_and_a_revision_before_them():
    key = ResourceKey("Mesh", None, "m")
    first = Deleted(revision=5, key=key, version=1, labels={})
    again = Deleted(revision=5, key=key, version=1, labels={})
    with pytest.raises(ValueError, match="must increase: 5 follows 5"):
        batch_frames("e", [first, again], max_frame_size=1000)
    with pytest.raises(ValueError, match="revision 4 is before the last event's revision 5"):
        batch_frames("e", [first], max_frame_size=1000, revision=4)


def _big_resource(name, size):
    return Resource(
        key=ResourceKey("Mesh", None, name),
        labels={},
        spec={"x": "y" * size},
        version=1,
        created_at=NOW,
        modified_at=NOW,
    )


def test_an_event_too_large_for_any_frame_is_a_clear_error():
    small = Upserted(revision=1, resource=_big_resource("small", 10))
    huge = Upserted(revision=2, resource=_big_resource("huge", 5000))
    with pytest.raises(
        FrameTooLargeError,
        match=r"Upserted event of Mesh/huge at revision 2 .* exceeds the frame size limit of 1000",
    ) as caught:
        batch_frames("e", [small, huge], max_frame_size=1000)
    assert caught.value.limit == 1000
    assert caught.value.size > 5000


@given(
    epoch=epochs,
    revision=st.integers(0, 2**40),
    snapshot=st.lists(resources(), max_size=12, unique_by=lambda r: r.key),
    slack=st.integers(0, 1500),
)
def test_reset_frames_keep_order_and_fit_the_limit(epoch, revision, snapshot, slack):
    def alone(resource):
        frame = Reset(
            epoch=epoch, revision=revision, index=len(snapshot), resources=(resource,), final=False
        )
        return len(encode_frame(frame))

    empty = Reset(epoch=epoch, revision=revision, index=0, resources=(), final=True)
    sizes = [alone(resource) for resource in snapshot]
    limit = max(sizes, default=len(encode_frame(empty))) + slack
    chunks = list(reset_frames(epoch, revision, snapshot, max_frame_size=limit))
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    assert [chunk.final for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [resource for chunk in chunks for resource in chunk.resources] == snapshot
    for chunk in chunks:
        assert (chunk.epoch, chunk.revision) == (epoch, revision)
        assert len(encode_frame(chunk)) <= limit
    checker = _established(Role.ZONE, zone_cursor=None)
    for chunk in chunks:
        checker.received(chunk)
    assert checker.inbound == Cursor(epoch, revision)


@given(
    epoch=epochs,
    revision=st.integers(0, 2**40),
    index=st.integers(0, 2**33),
    snapshot=st.lists(resources(), max_size=20, unique_by=lambda r: r.key),
    final=st.booleans(),
)
def test_a_reset_from_packed_rows_encodes_as_encode_frame_does(
    epoch, revision, index, snapshot, final
):
    frame = Reset(
        epoch=epoch, revision=revision, index=index, resources=tuple(snapshot), final=final
    )
    assert encode_reset(frame, pack_resource) == encode_frame(frame)


def test_a_resource_that_cannot_be_packed_is_named():
    bad = attrs.evolve(_big_resource("m", 1), spec={"x": 2**70})
    with pytest.raises(ValueError, match="cannot encode resource Mesh/m"):
        pack_resource(bad)


def test_empty_snapshot_is_one_final_chunk():
    assert list(reset_frames("e", 0, [], max_frame_size=100)) == [
        Reset(epoch="e", revision=0, index=0, resources=(), final=True)
    ]


def test_reset_frames_refuse_duplicates_and_oversized_resources():
    resource = _big_resource("m", 10)
    with pytest.raises(ValueError, match="Mesh/m appears twice"):
        list(reset_frames("e", 1, [resource, resource], max_frame_size=10_000))
    with pytest.raises(
        FrameTooLargeError, match=r"resource Mesh/huge .* exceeds the frame size limit of 500"
    ):
        list(reset_frames("e", 1, [resource, _big_resource("huge", 1000)], max_frame_size=500))


def test_reset_frames_take_resources_only_as_frames_are_made():
    # A sender sends each frame before asking for the next: it must never hold the
    # whole (mapped) snapshot, only the frame it sends and the one being filled.
    taken = 0

    def snapshot():
        nonlocal taken
        for number in range(1000):
            taken += 1
            yield _big_resource(f"m{number:04d}", 100)

    frames = reset_frames("e", 7, snapshot(), max_frame_size=2000)
    first = next(frames)
    per_frame = len(first.resources)
    assert 1 < per_frame < 100
    # This frame, the next (to know this one is not final) and the one that overflowed it.
    assert taken <= 2 * per_frame + 1
    rest = list(frames)
    assert taken == 1000
    assert sum(len(frame.resources) for frame in [first, *rest]) == 1000
    assert [frame.index for frame in [first, *rest]] == list(range(len(rest) + 1))
    assert rest[-1].final
    assert not any(frame.final for frame in [first, *rest[:-1]])


def test_a_resource_too_large_is_found_when_its_frame_is_made():
    resources = [_big_resource(f"m{number}", 100) for number in range(40)]
    frames = reset_frames("e", 1, [*resources, _big_resource("huge", 5000)], max_frame_size=2000)
    sent = [next(frames)]
    with pytest.raises(FrameTooLargeError, match="resource Mesh/huge"):
        sent.extend(frames)
    # The frames made before it hold the snapshot's first resources, and none is final.
    made = [r for frame in sent for r in frame.resources]
    assert 0 < len(made) < len(resources)
    assert made == resources[: len(made)]
    assert not any(frame.final for frame in sent)


def test_unencodable_events_are_a_value_error():
    bad = Upserted(revision=1, resource=attrs.evolve(_big_resource("m", 1), spec={"x": 2**70}))
    with pytest.raises(ValueError, match="cannot encode the event at revision 1"):
        batch_frames("e", [bad], max_frame_size=1000)
    with pytest.raises(ValueError, match="cannot encode Ping frame"):
        encode_frame(Ping(nonce=2**70))


# -- frame order ------------------------------------------------------------------------------


def _hello(cursor=None, versions=(1,), features=frozenset({"a", "b"})):
    return attrs.evolve(HELLO, cursor=cursor, protocol_versions=versions, features=features)


def _welcome(cursor=None, version=1, features=frozenset({"a"})):
    return Welcome(
        protocol_version=version,
        features=features,
        instance_id="global-1",
        cursor=cursor,
        max_frame_size=1024,
        types=frozenset({"Mesh"}),
        heartbeat_interval=5.0,
        software_version="0.1.0",
    )


def _established(role, *, zone_cursor=None, global_cursor=None):
    """A checker after a successful handshake carrying these cursors."""
    checker = ProtocolChecker(role)
    hello, welcome = _hello(zone_cursor), _welcome(global_cursor)
    if role is Role.ZONE:
        checker.sent(hello)
        checker.received(welcome)
    else:
        checker.received(hello)
        checker.sent(welcome)
    assert checker.established
    return checker


def _deleted(revision, name="m"):
    return Deleted(revision=revision, key=ResourceKey("Mesh", None, name), version=1, labels={})


def _batch(*revisions, epoch="e", revision=None):
    events = tuple(_deleted(r, f"m{r}") for r in revisions)
    return Batch(
        epoch=epoch, events=events, revision=revision if revision is not None else revisions[-1]
    )


def _reset(index, *names, final=False, epoch="e", revision=10):
    resources = tuple(_big_resource(name, 1) for name in names)
    return Reset(epoch=epoch, revision=revision, index=index, resources=resources, final=final)


class Conversation:
    """Both ends of a session, fed the same frames in the same order."""

    def __init__(self):
        self.zone = ProtocolChecker(Role.ZONE)
        self.global_ = ProtocolChecker(Role.GLOBAL)

    def up(self, frame):
        self.zone.sent(frame)
        self.global_.received(frame)

    def down(self, frame):
        self.global_.sent(frame)
        self.zone.received(frame)


def test_a_full_session_is_accepted_by_both_ends():
    talk = Conversation()
    talk.up(_hello(cursor=Cursor("g-epoch", 4)))
    talk.down(_welcome(cursor=None))
    # Global → zone resumes after the zone's cursor.
    talk.down(_batch(5, 7, epoch="g-epoch"))
    talk.down(_batch(9, epoch="g-epoch", revision=12))
    # Zone → global has no cursor: it starts with a reset.
    talk.up(_reset(0, "a", "b", epoch="z-epoch", revision=30))
    talk.up(_reset(1, "c", epoch="z-epoch", revision=30, final=True))
    talk.up(_batch(31, epoch="z-epoch"))
    assert talk.global_.unacked == 2
    assert talk.zone.unacked == 2
    talk.up(Ack(revision=7))
    talk.up(Nack(revision=12, rejected=(Rejection(ResourceKey("Mesh", None, "m9"), "invalid"),)))
    talk.down(Nack(revision=30, rejected=(Rejection(ResourceKey("Mesh", None, "c"), "conflict"),)))
    talk.down(Ack(revision=31))
    talk.up(Ping(nonce=1))
    talk.down(Ping(nonce=1))
    talk.down(Pong(nonce=1))
    talk.up(Pong(nonce=1))
    # The global's log was replaced: a reset in a new epoch, then batches after it.
    talk.down(_reset(0, "x", epoch="g-epoch-2", revision=3, final=True))
    talk.down(_batch(4, epoch="g-epoch-2"))
    talk.up(Ack(revision=3))
    talk.up(Ack(revision=4))
    assert talk.zone.inbound == talk.global_.outbound == Cursor("g-epoch-2", 4)
    assert talk.zone.outbound == talk.global_.inbound == Cursor("z-epoch", 31)
    assert talk.zone.unacked == talk.global_.unacked == 0
    talk.up(Goodbye(code=GoodbyeCode.SHUTDOWN, reason="bye"))
    assert talk.zone.ended
    assert talk.global_.ended


def test_a_reject_ends_the_handshake():
    talk = Conversation()
    talk.up(_hello())
    talk.down(Reject(reason="bad token", retryable=False))
    assert talk.zone.ended
    assert not talk.zone.established
    with pytest.raises(ProtocolError, match="already ended"):
        talk.zone.received(_welcome())
    with pytest.raises(ValueError, match="already ended"):
        talk.global_.sent(_welcome())


# Each case: who receives, the cursors of the handshake, frames accepted before, the bad
# frame, and what the error says.
OUT_OF_ORDER = {
    "global receives a batch before hello": (
        Role.GLOBAL,
        None,
        [],
        _batch(1),
        "zone's first frame must be Hello",
    ),
    "global receives a second hello": (Role.GLOBAL, None, [_hello()], _hello(), "wait for Welcome"),
    "zone receives a batch before welcome": (
        Role.ZONE,
        None,
        ["sent-hello"],
        _batch(1),
        "first frame must be Welcome or Reject",
    ),
    "zone receives welcome before sending hello": (
        Role.ZONE,
        None,
        [],
        _welcome(),
        "wait for the zone's Hello",
    ),
    "welcome with a version not offered": (
        Role.ZONE,
        None,
        ["sent-hello"],
        _welcome(version=2),
        "version 2, which the zone did not offer",
    ),
    "welcome with a feature not offered": (
        Role.ZONE,
        None,
        ["sent-hello"],
        _welcome(features=frozenset({"zzz"})),
        r"features the zone did not offer: \['zzz'\]",
    ),
    "handshake frame after the handshake": (
        Role.ZONE,
        Cursor("e", 0),
        ["established"],
        _welcome(),
        "handshake is already complete",
    ),
    "hello after the handshake": (
        Role.GLOBAL,
        Cursor("e", 0),
        ["established"],
        _hello(),
        "handshake is already complete",
    ),
    "batch without a cursor": (Role.ZONE, None, ["established"], _batch(1), "before any Reset"),
    "batch of another epoch": (
        Role.ZONE,
        Cursor("e", 0),
        ["established"],
        _batch(1, epoch="other"),
        "epoch 'other'.*must start with a Reset",
    ),
    "batch at the cursor": (
        Role.ZONE,
        Cursor("e", 5),
        ["established"],
        _batch(5),
        "starting at revision 5.*already at revision 5",
    ),
    "replayed batch": (
        Role.ZONE,
        Cursor("e", 0),
        ["established", _batch(1, 2)],
        _batch(2, 3),
        "starting at revision 2.*already at revision 2",
    ),
    "empty batch that does not advance": (
        Role.ZONE,
        Cursor("e", 3),
        ["established"],
        Batch(epoch="e", events=(), revision=3),
        "already at revision 3",
    ),
    "batch inside a reset": (
        Role.ZONE,
        Cursor("e", 0),
        ["established", _reset(0, "a")],
        _batch(11),
        "middle of the reset to revision 10; expected its chunk 1",
    ),
    "reset not starting at chunk 0": (
        Role.ZONE,
        None,
        ["established"],
        _reset(1, "a"),
        "chunk 1 arrived before chunk 0",
    ),
    "reset skipping a chunk": (
        Role.ZONE,
        None,
        ["established", _reset(0, "a")],
        _reset(2, "b"),
        "chunk 2 arrived, expected chunk 1",
    ),
    "reset chunk of another snapshot": (
        Role.ZONE,
        None,
        ["established", _reset(0, "a")],
        _reset(1, "b", revision=11),
        "snapshot at 'e'/11 arrived in the middle of the snapshot at 'e'/10",
    ),
    "reset repeating a key across chunks": (
        Role.ZONE,
        None,
        ["established", _reset(0, "a")],
        _reset(1, "a", final=True),
        "Mesh/a appears in two chunks",
    ),
    "batch not after a completed reset": (
        Role.ZONE,
        None,
        ["established", _reset(0, "a", final=True)],
        _batch(10),
        "starting at revision 10.*already at revision 10",
    ),
    "ack with nothing sent": (
        Role.GLOBAL,
        Cursor("e", 0),
        ["established"],
        Ack(revision=1),
        "no batch awaits one",
    ),
    "ack out of order": (
        Role.GLOBAL,
        Cursor("e", 0),
        ["established", "sent:batch 1", "sent:batch 2"],
        Ack(revision=2),
        "oldest batch awaiting one is at revision 1",
    ),
    "ack of a reset before its final chunk": (
        Role.GLOBAL,
        None,
        ["established", "sent:reset 0"],
        Ack(revision=10),
        "no batch awaits one",
    ),
    "nack of a resource the batch did not carry": (
        Role.GLOBAL,
        Cursor("e", 0),
        ["established", "sent:batch 1"],
        Nack(revision=1, rejected=(Rejection(ResourceKey("Mesh", None, "other"), "x"),)),
        "rejects Mesh/other, which that batch did not carry",
    ),
    "pong without ping": (
        Role.ZONE,
        None,
        ["established"],
        Pong(nonce=7),
        "no Ping with nonce 7 was sent",
    ),
    "frame after goodbye": (
        Role.GLOBAL,
        Cursor("e", 0),
        ["established", Goodbye(code="shutdown", reason="")],
        Ping(nonce=1),
        "already ended",
    ),
    "malformed batch": (
        Role.ZONE,
        Cursor("e", 0),
        ["established"],
        Batch(epoch="e", events=(_deleted(3), _deleted(2)), revision=3),
        "malformed: revisions must be strictly increasing",
    ),
}


def _prepare(role, cursor, setup):
    checker = ProtocolChecker(role)
    for step in setup:
        if step == "sent-hello":
            checker.sent(_hello())
        elif step == "established":
            checker = _established(role, zone_cursor=cursor, global_cursor=cursor)
        elif step == "sent:batch 1":
            checker.sent(_batch(1))
        elif step == "sent:batch 2":
            checker.sent(_batch(2))
        elif step == "sent:reset 0":
            checker.sent(_reset(0, "a"))
        else:
            checker.received(step)
    return checker


@pytest.mark.parametrize("case", sorted(OUT_OF_ORDER))
def test_out_of_order_frames_are_protocol_errors(case):
    role, cursor, setup, frame, message = OUT_OF_ORDER[case]
    checker = _prepare(role, cursor, setup)
    peer = "global" if role is Role.ZONE else "zone"
    with pytest.raises(
        ProtocolError,
        match=f"the {peer} sent a {type(frame).__name__} frame out of order: .*{message}",
    ):
        checker.received(frame)


def test_a_refused_frame_leaves_the_state_unchanged():
    checker = _established(Role.ZONE, zone_cursor=Cursor("e", 0))
    checker.received(_batch(1, 2))
    with pytest.raises(ProtocolError):
        checker.received(_batch(2))
    assert checker.inbound == Cursor("e", 2)
    checker.received(_batch(3))
    assert checker.inbound == Cursor("e", 3)
    checker.received(_reset(0, "a"))
    with pytest.raises(ProtocolError):
        checker.received(_reset(2, "b"))
    checker.received(_reset(1, "b", final=True))
    assert checker.inbound == Cursor("e", 10)


@pytest.mark.parametrize(
    ("role", "setup", "frame", "message"),
    [
        (Role.ZONE, [], _batch(1), "zone's first frame must be Hello"),
        (Role.ZONE, ["sent-hello"], _hello(), "wait for Welcome or Reject"),
        (Role.GLOBAL, [], _welcome(), "wait for the zone's Hello"),
        (Role.GLOBAL, [_hello(versions=(1,))], _welcome(version=3), "did not offer"),
        (Role.GLOBAL, [_hello()], _batch(1), "must be Welcome or Reject"),
        (Role.ZONE, ["established"], _batch(1), "before any Reset"),
        (Role.ZONE, ["established"], Ack(revision=1), "no batch awaits one"),
        (Role.ZONE, ["established"], Pong(nonce=1), "no Ping with nonce 1 awaits a Pong"),
        (
            Role.ZONE,
            ["established"],
            Batch(epoch="", events=(), revision=1),
            r"malformed: must not be empty @ \$\.epoch",
        ),
    ],
)
def test_sending_out_of_order_is_a_bug_on_this_side(role, setup, frame, message):
    checker = _prepare(role, None, setup)
    with pytest.raises(
        ValueError, match=f"cannot send a {type(frame).__name__} frame now: .*{message}"
    ):
        checker.sent(frame)


def test_a_ping_nonce_cannot_be_reused_while_unanswered():
    checker = _established(Role.ZONE)
    checker.sent(Ping(nonce=1))
    with pytest.raises(ValueError, match="nonce 1 is still unanswered"):
        checker.sent(Ping(nonce=1))
    checker.received(Pong(nonce=1))
    checker.sent(Ping(nonce=1))
    with pytest.raises(ProtocolError, match="no Ping with nonce 2 was sent"):
        checker.received(Pong(nonce=2))


@given(
    steps=st.lists(
        st.sampled_from(["batch", "empty", "reset", "ack", "nack", "ping"]), max_size=30
    ),
    chunks=st.integers(1, 3),
)
def test_random_valid_streams_are_accepted_and_tracked(steps, chunks):
    talk = Conversation()
    talk.up(_hello(cursor=None))
    talk.down(_welcome())
    head, epoch, generation = 0, None, 0
    in_flight: list[Batch | Reset] = []
    for step in steps:
        if step == "reset" or epoch is None:
            generation += 1
            epoch, head = f"epoch-{generation}", head + 5
            for index in range(chunks):
                talk.down(
                    _reset(
                        index, f"r{index}", epoch=epoch, revision=head, final=index == chunks - 1
                    )
                )
            in_flight.append(
                _reset(0, *[f"r{i}" for i in range(chunks)], epoch=epoch, revision=head)
            )
        elif step in {"batch", "empty"}:
            head += 3
            frame = (
                _batch(head - 1, head, epoch=epoch)
                if step == "batch"
                else Batch(epoch=epoch, events=(), revision=head)
            )
            talk.down(frame)
            in_flight.append(frame)
        elif step in {"ack", "nack"} and in_flight:
            oldest = in_flight.pop(0)
            keys = (
                [r.key for r in oldest.resources]
                if isinstance(oldest, Reset)
                else [e.key for e in oldest.events]
            )
            if step == "nack" and keys:
                talk.up(Nack(revision=oldest.revision, rejected=(Rejection(keys[0], "no"),)))
            else:
                talk.up(Ack(revision=oldest.revision))
        elif step == "ping":
            talk.up(Ping(nonce=head))
            talk.down(Pong(nonce=head))
        assert (
            talk.zone.inbound == talk.global_.outbound == (Cursor(epoch, head) if epoch else None)
        )
        assert talk.global_.unacked == len(in_flight)


# -- rows: the layout of events and resources, and how strictly they are read -------------


def _expected_row(value):
    """The row docs/protocol.md specifies for an event or a resource."""
    if isinstance(value, Resource):
        key = value.key
        return [
            key.type,
            key.mesh,
            key.name,
            dict(value.labels),
            value.spec,
            value.version,
            value.created_at.timestamp(),
            value.modified_at.timestamp(),
        ]
    if isinstance(value, Upserted):
        return [0, value.revision, *_expected_row(value.resource)]
    key = value.key
    return [1, value.revision, key.type, key.mesh, key.name, dict(value.labels), value.version]


@given(frame=batches() | resets)
def test_events_and_resources_are_rows_of_the_documented_layout(frame):
    wire = _wire(frame)
    if isinstance(frame, Batch):
        expected = {
            "kind": "batch",
            "epoch": frame.epoch,
            "events": [_expected_row(event) for event in frame.events],
            "revision": frame.revision,
        }
    else:
        expected = {
            "kind": "reset",
            "epoch": frame.epoch,
            "revision": frame.revision,
            "index": frame.index,
            "resources": [_expected_row(resource) for resource in frame.resources],
            "final": frame.final,
        }
    assert wire == expected
    assert list(wire) == list(expected)  # and in this order, so that equal frames are equal bytes


def test_a_typical_event_is_a_compact_row():
    resource = Resource(
        key=ResourceKey("MeshTimeout", "default", "timeout-0000123"),
        labels={"team": "team-3"},
        spec={
            "targetRef": {"kind": "Mesh"},
            "to": [{"targetRef": {"kind": "Mesh"}, "default": {}}],
            "generation": 1,
        },
        version=1,
        created_at=NOW,
        modified_at=NOW,
    )
    single = encode_frame(
        Batch(epoch="e", events=(Upserted(revision=1, resource=resource),), revision=1)
    )
    empty = encode_frame(Batch(epoch="e", events=(), revision=1))
    # The figure docs/protocol.md quotes (as a map of named fields, it took 235 bytes).
    assert len(single) - len(empty) == 140


# The codec's strict converter reading the same fields as a map: what a row must accept.
_REFERENCE = strict_converter()
_AWKWARD = st.sampled_from(
    [True, False, None, 0, -1, 1.5, 2**63, 1e300, "", "x", b"x", [], ["x"], {}, {"a": "b"}]
)


def _reference(row, layout):
    """What the codec's converter makes of *row*'s fields as a map, or None if it refuses them."""
    fields = dict(zip(layout, row, strict=False))
    key = {name: fields[name] for name in ("type", "mesh", "name")}
    resource_fields = ("labels", "spec", "version", "created_at", "modified_at")
    cls: type[Any]
    if layout is RESOURCE_ROW:
        cls, data = Resource, {"key": key, **{name: fields[name] for name in resource_fields}}
    elif layout is UPSERTED_ROW:
        resource = {"key": key, **{name: fields[name] for name in resource_fields}}
        cls, data = Upserted, {"revision": fields["revision"], "resource": resource}
    else:
        cls, data = Deleted, {**{name: fields[name] for name in DELETED_ROW[1:]}, "key": key}
    try:
        return _REFERENCE.structure(data, cls)
    except Exception:
        return None


def _read(wire):
    """Read a Batch or Reset frame's fields and rows, without the per-frame rules."""
    from kds import protocol

    # Through bytes, so that the reader sees exactly what msgpack gives it.
    data = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True))
    return protocol._read_batch(data) if data["kind"] == "batch" else protocol._read_reset(data)


def _read_or_error(wire):
    from kds import protocol

    try:
        return _read(wire), None
    except protocol._Invalid as exc:
        return None, exc


@given(frame=batches() | resets, data=st.data())
def test_rows_are_exactly_as_strict_as_the_codec(frame, data):
    """A row element accepts what the codec accepts for that field, and nothing else."""
    wire = _wire(frame)
    items, layout_of = _rows(frame)
    rows = wire[items]
    assume(rows)
    index = data.draw(st.integers(0, len(rows) - 1))
    row = rows[index]
    layout = layout_of(row)
    # Every element but the event kind, which the tests above and below cover.
    field = data.draw(st.sampled_from([name for name in layout if name != "kind"]))
    row[layout.index(field)] = data.draw(_AWKWARD | msgpack_values())
    reference = _reference(msgpack.unpackb(msgpack.packb(row, use_bin_type=True)), layout)
    decoded, error = _read_or_error(wire)
    if error is not None:
        assert reference is None
        path = f"$.{items}[{index}].{field}"
        assert error.path == path or (field == "labels" and error.path.startswith(path + "["))
    else:
        assert reference is not None
        original = list(getattr(frame, items))
        original[index] = reference
        assert getattr(decoded, items) == tuple(original)


@given(frame=batches() | resets, data=st.data(), trailing=extra_elements)
def test_rows_may_be_longer_but_not_shorter(frame, data, trailing):
    from kds import protocol

    wire = _wire(frame)
    items, layout_of = _rows(frame)
    rows = wire[items]
    assume(rows)
    index = data.draw(st.integers(0, len(rows) - 1))
    row = rows[index]
    layout = layout_of(row)
    row.extend(trailing)
    assert _read(wire) == frame
    cut = data.draw(st.integers(0, len(layout) - 1))
    del row[cut:]
    with pytest.raises(protocol._Invalid, match="required field missing") as caught:
        _read(wire)
    assert caught.value.path == f"$.{items}[{index}].{layout[cut]}"


@given(tag=msgpack_values().filter(lambda tag: tag not in (0, 1) or type(tag) is not int))
def test_an_event_kind_is_0_or_1_and_nothing_else(tag):
    data = _row_with(BATCH, 2, "kind", tag)
    with pytest.raises(ProtocolError, match=r"@ \$\.events\[2\]\.kind$"):
        _decode(data)
