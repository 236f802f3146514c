"""The API's resource representation: flat and nested forms, paths, strict reading."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds import DEFAULT_CATALOG, Resource, ResourceKey, ResourceType, Scope, ValidationError
from kds.api import from_json, to_json, type_path
from kds.api.representation import FLAT_RESERVED_KEYS, MAX_SPEC_DEPTH, label_field
from kds.testing import strategies as kst

CREATED = dt.datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=dt.UTC)
MODIFIED = dt.datetime(2024, 5, 2, 8, 30, tzinfo=dt.UTC)


def resource(key, spec, labels=None):
    return Resource(
        key=key,
        labels=labels or {},
        spec=spec,
        version=1,
        created_at=CREATED,
        modified_at=MODIFIED,
    )


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_name", "path"),
    [
        ("Mesh", "meshes"),
        ("Zone", "zones"),
        ("ZoneInsight", "zone-insights"),
        ("ZoneIngress", "zoneingresses"),
        ("ZoneIngressInsight", "zone-ingress-insights"),
        ("ZoneEgress", "zoneegresses"),
        ("ZoneEgressInsight", "zoneegressinsights"),
        ("Dataplane", "dataplanes"),
        ("DataplaneInsight", "dataplane-insights"),
        ("ServiceInsight", "service-insights"),
        ("MeshInsight", "mesh-insights"),
        ("Secret", "secrets"),
        ("GlobalSecret", "global-secrets"),
        ("MeshTimeout", "meshtimeouts"),
        ("MeshService", "meshservices"),
        ("Config", "configs"),
        ("MeshGateway", "meshgateways"),
        ("Box", "boxes"),
        ("AuditPolicy", "auditpolicys"),
    ],
)
def test_type_paths_follow_kuma(type_name, path):
    assert type_path(type_name) == path
    if type_name in DEFAULT_CATALOG:
        assert type_path(DEFAULT_CATALOG[type_name]) == path


def test_every_catalog_type_has_its_own_path():
    paths = [type_path(t) for t in DEFAULT_CATALOG]
    assert len(set(paths)) == len(paths)


# -- output --------------------------------------------------------------------------------


def test_flat_types_show_their_spec_beside_the_metadata():
    mesh = resource(ResourceKey("Mesh", None, "default"), {"mtls": {"enabled": True}})
    assert to_json(mesh, DEFAULT_CATALOG) == {
        "type": "Mesh",
        "name": "default",
        "creationTime": "2024-05-01T12:00:00.500000Z",
        "modificationTime": "2024-05-02T08:30:00Z",
        "mtls": {"enabled": True},
    }


def test_policies_show_their_spec_under_spec_with_mesh_and_labels():
    timeout = resource(
        ResourceKey("MeshTimeout", "default", "t1"),
        {"targetRef": {"kind": "Mesh"}},
        {"kuma.io/origin": "global"},
    )
    assert to_json(timeout, DEFAULT_CATALOG) == {
        "type": "MeshTimeout",
        "mesh": "default",
        "name": "t1",
        "labels": {"kuma.io/origin": "global"},
        "creationTime": "2024-05-01T12:00:00.500000Z",
        "modificationTime": "2024-05-02T08:30:00Z",
        "spec": {"targetRef": {"kind": "Mesh"}},
    }


def test_values_json_lacks_are_shown_as_text():
    spec = {"blob": b"\x00\xff", "n": [math.inf, -math.inf, math.nan], "m": {b"k": 1}}
    shown = to_json(resource(ResourceKey("Box", None, "b"), spec), DEFAULT_CATALOG)
    assert shown["spec"] == {
        "blob": "AP8=",
        "n": ["Infinity", "-Infinity", "NaN"],
        "m": {"aw==": 1},
    }
    json.dumps(shown, allow_nan=False)


def test_a_flat_spec_cannot_shadow_metadata():
    mesh = resource(ResourceKey("Mesh", None, "default"), {"name": "other", "mtls": {}})
    shown = to_json(mesh, DEFAULT_CATALOG)
    assert shown["name"] == "default"
    assert shown["mtls"] == {}


# -- input ---------------------------------------------------------------------------------


def test_reading_a_flat_document():
    key, labels, spec = from_json(
        {
            "type": "Mesh",
            "name": "default",
            "labels": {"team": "core"},
            "creationTime": "ignored",
            "modificationTime": 5,
            "mtls": {"enabledBackend": "ca-1"},
        },
        DEFAULT_CATALOG,
    )
    assert key == ResourceKey("Mesh", None, "default")
    assert labels == {"team": "core"}
    assert spec == {"mtls": {"enabledBackend": "ca-1"}}


def test_reading_a_nested_document_with_mesh_from_the_document_or_the_default():
    document = {"type": "MeshTimeout", "name": "t1", "spec": {"targetRef": {"kind": "Mesh"}}}
    key, labels, spec = from_json(document, DEFAULT_CATALOG, mesh="default")
    assert key == ResourceKey("MeshTimeout", "default", "t1")
    assert (labels, spec) == ({}, {"targetRef": {"kind": "Mesh"}})
    key, _, _ = from_json({**document, "mesh": "demo"}, DEFAULT_CATALOG, mesh="default")
    assert key.mesh == "demo"


def test_absent_or_null_labels_and_spec_are_empty():
    _, labels, spec = from_json(
        {"type": "MeshTimeout", "mesh": "m", "name": "t", "labels": None, "spec": None},
        DEFAULT_CATALOG,
    )
    assert (labels, spec) == ({}, {})


@pytest.mark.parametrize(
    ("document", "field", "reason"),
    [
        ([], "document", "must be an object, got a list"),
        ({1: "x"}, "document", "field names must be strings"),
        ({"name": "x"}, "type", "is required"),
        ({"type": 3, "name": "x"}, "type", "must be a string, got an integer"),
        ({"type": "MeshTimeut", "mesh": "m", "name": "x"}, "type", "did you mean 'MeshTimeout'"),
        ({"type": "Mesh"}, "name", "is required"),
        ({"type": "Mesh", "name": ""}, "name", "must not be empty"),
        ({"type": "Mesh", "name": "a b"}, "name", "whitespace"),
        ({"type": "Mesh", "name": 7}, "name", "must be a string"),
        ({"type": "Mesh", "name": "x", "mesh": "m"}, "mesh", "Mesh is not in a mesh"),
        ({"type": "MeshTimeout", "name": "x"}, "mesh", "is required"),
        ({"type": "MeshTimeout", "name": "x", "mesh": "a\tb"}, "mesh", "whitespace"),
        ({"type": "Mesh", "name": "x", "labels": []}, "labels", "must be an object"),
        ({"type": "Mesh", "name": "x", "labels": {"": "v"}}, "labels", "non-empty strings"),
        ({"type": "Mesh", "name": "x", "labels": {"team": 1}}, 'labels["team"]', "string"),
        ({"type": "Mesh", "name": "x", "mtls": []}, "spec.mtls", "must be a mapping"),
        ({"type": "Mesh", "name": "x", "spec": {}}, "spec", "at the top level"),
        ({"type": "MeshTimeout", "mesh": "m", "name": "x", "spec": 1}, "spec", "an object"),
        (
            {"type": "MeshTimeout", "mesh": "m", "name": "x", "targetRef": {}},
            "targetRef",
            "unknown field: MeshTimeout keeps its fields under spec",
        ),
        (
            {"type": "MeshTimeout", "mesh": "m", "name": "x", "spec": {"to": {}}},
            "spec.to",
            "must be a list",
        ),
        ({"type": "Mesh", "name": "x", "when": dt.date(2024, 1, 1)}, "spec.when", "got date"),
        ({"type": "Mesh", "name": "x", "n": [1, 2**64]}, "spec.n[1]", "64 bits"),
        ({"type": "Mesh", "name": "x", "n": {"f": math.nan}}, "spec.n.f", "finite"),
        ({"type": "Mesh", "name": "x", "n": {1: "one"}}, "spec.n", "field names must be strings"),
    ],
)
def test_bad_documents_name_the_field(document, field, reason):
    with pytest.raises(ValidationError) as caught:
        from_json(document, DEFAULT_CATALOG)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_nesting_is_bounded():
    deep: object = 1
    for _ in range(MAX_SPEC_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValidationError, match="nested more than"):
        from_json({"type": "Mesh", "name": "x", "deep": deep}, DEFAULT_CATALOG)
    shallow: object = 1
    for _ in range(MAX_SPEC_DEPTH - 1):
        shallow = [shallow]
    from_json({"type": "Mesh", "name": "x", "deep": shallow}, DEFAULT_CATALOG)


def test_label_fields_are_quoted():
    assert label_field("kuma.io/origin") == 'labels["kuma.io/origin"]'


# -- round trip ----------------------------------------------------------------------------

# Custom types too: a global-scoped nested type and a mesh-scoped flat one.
CATALOG = DEFAULT_CATALOG.with_types(
    ResourceType(name="AuditPolicy", scope=Scope.GLOBAL),
    ResourceType(name="LegacyThing", scope=Scope.MESH, flat_spec=True),
)

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
NAMES = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zs", "Zl", "Zp", "Cf", "Co"]),
    min_size=1,
    max_size=20,
).filter(str.isprintable)


@st.composite
def documents(draw):
    resource_type = draw(st.sampled_from(list(CATALOG)))
    mesh = draw(NAMES) if resource_type.scope is Scope.MESH else None
    key = ResourceKey(resource_type.name, mesh, draw(NAMES))
    labels = draw(st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10)))
    fields = st.text(max_size=10)
    if resource_type.flat_spec:
        fields = fields.filter(lambda name: name not in FLAT_RESERVED_KEYS)
    known = (
        kst.specs(resource_type.name, catalog=CATALOG, rich=False)
        if resource_type.name in kst.TYPES
        else st.just({})
    )
    spec = {**draw(known), **draw(st.dictionaries(fields, JSON_VALUES, max_size=4))}
    try:
        resource_type.validate_spec(spec)
    except ValidationError:
        spec = draw(known)
    return resource(key, spec, labels)


@given(documents())
def test_to_json_then_from_json_gives_back_key_labels_and_spec(stored):
    shown = to_json(stored, CATALOG)
    # Through real JSON text, as a client sees it.
    document = json.loads(json.dumps(shown, allow_nan=False))
    assert from_json(document, CATALOG) == (stored.key, dict(stored.labels), dict(stored.spec))


@given(
    st.sampled_from(list(CATALOG)),
    st.dictionaries(st.text(max_size=5), kst.msgpack_values(), max_size=4),
)
def test_to_json_always_gives_strict_json(resource_type, spec):
    mesh = "m" if resource_type.scope is Scope.MESH else None
    shown = to_json(resource(ResourceKey(resource_type.name, mesh, "n"), spec), CATALOG)
    json.dumps(shown, allow_nan=False)
