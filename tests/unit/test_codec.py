from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds import (
    Codec,
    Cursor,
    DecodeError,
    Deleted,
    Resource,
    ResourceKey,
    Tracking,
    Upserted,
)

CODEC = Codec()
NOW = datetime(2026, 11, 25, 12, 30, 15, 123456, tzinfo=UTC)

RESOURCE = Resource(
    key=ResourceKey("Zone", None, "zone-1"),
    labels={"kuma.io/origin": "global"},
    spec={"enabled": True},
    version=3,
    created_at=NOW,
    modified_at=NOW,
)
UPSERTED = Upserted(revision=7, resource=RESOURCE)
DELETED = Deleted(
    revision=8, key=ResourceKey("Dataplane", "default", "dp-1"), version=2, labels={"a": "b"}
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize(
    ("value", "cls"),
    [
        (RESOURCE, Resource),
        (RESOURCE.key, ResourceKey),
        (Cursor("epoch-1", 42), Cursor),
        (Tracking("global", Cursor("e", 0)), Tracking),
    ],
)
def test_round_trip(value, cls):
    assert CODEC.decode(CODEC.encode(value), cls) == value


@pytest.mark.parametrize("event", [UPSERTED, DELETED])
def test_events_round_trip_with_their_kind(event):
    data = CODEC.encode(event)
    assert msgpack.unpackb(data)["kind"] in {"upserted", "deleted"}
    assert CODEC.decode_event(data) == event


def test_timestamps_keep_microseconds():
    decoded = CODEC.decode(CODEC.encode(RESOURCE), Resource)
    assert decoded.modified_at == NOW
    assert decoded.modified_at.tzinfo is not None


def _resource_dict(**changes):
    data = CODEC.unstructure(RESOURCE)
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_resource_dict(version="3"), r"\$\.version"),
        (_resource_dict(version=True), r"\$\.version"),
        (_resource_dict(labels={"a": 1}), r"\$\.labels\['a'\]"),
        (_resource_dict(labels=["a"]), r"\$\.labels"),
        (_resource_dict(spec={"enabled": "yes"}), r"\$\.spec\.enabled"),
        (_resource_dict(spec=[1]), r"\$\.spec"),
        (_resource_dict(version=0), r"\$\.version"),
        (
            _resource_dict(key={"type": "NoSuchType", "mesh": None, "name": "x"}),
            r"unknown resource type 'NoSuchType' @ \$\.key\.type",
        ),
        (
            _resource_dict(key={"type": "Zone", "mesh": "default", "name": "x"}),
            r"\$\.key\.mesh",
        ),
        (_resource_dict(created_at="yesterday"), r"\$\.created_at"),
        ({"key": CODEC.unstructure(RESOURCE.key)}, r"required field missing @ \$\.labels"),
        ([1, 2, 3], r"expected a mapping, got list @ \$"),
    ],
)
def test_bad_resources_name_the_field(data, message):
    with pytest.raises(DecodeError, match=message):
        CODEC.decode(msgpack.packb(data), Resource)


def test_unknown_event_kind_is_named():
    data = {**CODEC.unstructure(UPSERTED), "kind": "renamed"}
    with pytest.raises(DecodeError, match=r"unknown kind 'renamed'.*\$\.kind"):
        CODEC.decode_event(msgpack.packb(data))


def test_unknown_extra_fields_are_ignored_for_newer_peers():
    data = {**_resource_dict(), "future_field": [1, 2]}
    assert CODEC.decode(msgpack.packb(data), Resource) == RESOURCE


def test_truncated_and_trailing_input():
    data = CODEC.encode(UPSERTED)
    with pytest.raises(DecodeError, match="not valid msgpack"):
        CODEC.decode_event(data[:-1])
    with pytest.raises(DecodeError, match="trailing bytes"):
        CODEC.decode_event(data + b"\x00")
    with pytest.raises(DecodeError, match="not valid msgpack"):
        CODEC.decode_event(b"")


def test_oversized_input_is_refused_before_parsing():
    codec = Codec(max_size=64)
    data = codec.encode(UPSERTED)
    assert len(data) > 64
    with pytest.raises(DecodeError, match=rf"Event of {len(data)} bytes exceeds the limit of 64"):
        codec.decode_event(data)


def test_non_bytes_input():
    with pytest.raises(DecodeError, match="expected bytes"):
        CODEC.decode("text", Resource)  # type: ignore[arg-type]


@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(data):
    for cls in (Resource, ResourceKey, Cursor, Tracking):
        with contextlib.suppress(DecodeError):
            CODEC.decode(data, cls)
    with contextlib.suppress(DecodeError):
        CODEC.decode_event(data)


@given(value=msgpack_values)
def test_arbitrary_msgpack_never_raises_anything_but_decode_error(value):
    data = msgpack.packb(value, use_bin_type=True)
    for cls in (Resource, ResourceKey, Cursor, Tracking):
        with contextlib.suppress(DecodeError):
            CODEC.decode(data, cls)


@given(
    field=st.sampled_from(["key", "labels", "spec", "version", "created_at", "modified_at"]),
    value=msgpack_values,
)
def test_any_field_replaced_by_any_value_decodes_valid_or_raises_decode_error(field, value):
    data = msgpack.packb({**_resource_dict(), field: value}, use_bin_type=True)
    try:
        decoded = CODEC.decode(data, Resource)
    except DecodeError:
        return
    # Whatever was accepted is a well-formed resource.
    assert decoded.version >= 1
    labels: list[tuple[object, object]] = list(decoded.labels.items())
    assert all(type(k) is str and type(v) is str for k, v in labels)


@given(
    field=st.sampled_from(["kind", "revision", "resource", "key", "version", "labels"]),
    value=msgpack_values,
)
def test_any_event_field_replaced_decodes_valid_or_raises_decode_error(field, value):
    for event in (UPSERTED, DELETED):
        data = msgpack.packb({**CODEC.unstructure(event), field: value}, use_bin_type=True)
        with contextlib.suppress(DecodeError):
            CODEC.decode_event(data)
