from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds import (
    DEFAULT_CATALOG,
    LABEL_DISPLAY_NAME,
    LABEL_K8S_NAMESPACE,
    LABEL_ZONE,
    Catalog,
    ResourceKey,
    ResourceType,
    Scope,
    SyncFlag,
    ValidationError,
    hashed_name,
    optional_fields,
    sync_name,
)
from kds.resource import MAX_NAME_LENGTH


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # The golden names of Kuma's pkg/kds/context/testdata/full_sync.
        (("default", "default-timeout-global"), "default-timeout-global-54dbd4c66zwbcf9c"),
        (
            ("default", "default-timeout-zone-1", "zone-1"),
            "default-timeout-zone-1-c58w24w4vw27f454",
        ),
        (("default", "redis-zone-2", "zone-2"), "redis-zone-2-ff29vc4685c6f594"),
    ],
)
def test_hashed_name_reproduces_kuma(args, expected):
    assert hashed_name(*args) == expected


@given(mesh=st.text(max_size=20), name=st.text(min_size=1, max_size=400))
def test_hashed_name_fits_a_dns_name_and_is_stable(mesh, name):
    result = hashed_name(mesh, name)
    assert len(result) <= MAX_NAME_LENGTH
    prefix, _, suffix = result.rpartition("-")
    assert prefix == name[:236]
    assert len(suffix) == 16
    assert set(suffix) <= set("bcdfghjklmnpqrstvwxz2456789")
    assert hashed_name(mesh, name) == result


def test_hashed_name_depends_on_every_part():
    names = {
        hashed_name("default", "redis"),
        hashed_name("other", "redis"),
        hashed_name("default", "redis", "zone-1"),
        hashed_name("default", "redis", "zone-2"),
    }
    assert len(names) == 4


def test_sync_name_uses_display_name_zone_and_namespace_labels():
    key = ResourceKey("MeshService", "default", "redis-zone-2-ff29vc4685c6f594")
    labels = {LABEL_DISPLAY_NAME: "redis-zone-2", LABEL_ZONE: "zone-2"}
    # A copy of a copy keeps the name: the hash is over the display name.
    assert sync_name(key, labels) == "redis-zone-2-ff29vc4685c6f594"
    with_ns = {**labels, LABEL_K8S_NAMESPACE: "kuma-demo"}
    assert sync_name(key, with_ns) == hashed_name("default", "redis-zone-2", "zone-2", "kuma-demo")
    plain = ResourceKey("MeshTimeout", "default", "default-timeout-global")
    assert sync_name(plain, {}) == "default-timeout-global-54dbd4c66zwbcf9c"


def test_sync_flags_match_kuma_bitmask():
    values = {flag.name: int(flag) for flag in SyncFlag}
    assert values == {
        "CONSUMED_BY_ZONE": 1,
        "CONSUMED_BY_GLOBAL": 4,
        "PROVIDED_BY_ZONE": 8,
        "PROVIDED_BY_GLOBAL": 16,
        "SYNCED_ACROSS_ZONES": 32,
        "DISABLED_BY_DEFAULT": 64,
    }
    assert int(SyncFlag.GLOBAL_TO_ZONES) == 17
    assert int(SyncFlag.ZONE_TO_GLOBAL) == 12


@pytest.mark.parametrize(
    ("name", "down", "up", "on_global", "on_zone"),
    [
        ("Mesh", True, False, True, False),
        ("Secret", True, False, True, True),
        ("MeshTimeout", True, True, True, True),
        ("MeshGateway", True, True, True, True),
        ("ZoneIngress", True, True, False, True),
        ("MeshService", True, True, False, True),
        ("Dataplane", False, True, False, True),
        ("ZoneEgress", False, True, False, True),
        ("Zone", False, False, True, True),
        ("ZoneInsight", False, False, True, True),
    ],
)
def test_default_catalog_directions(name, down, up, on_global, on_zone):
    resource_type = DEFAULT_CATALOG[name]
    assert resource_type.sent_from_global is down
    assert resource_type.sent_from_zone is up
    assert resource_type.writable_on_global is on_global
    assert resource_type.writable_on_zone is on_zone


def test_names_are_not_hashed_for_kumas_skip_list():
    skipped = {t.name for t in DEFAULT_CATALOG if not t.hash_names}
    assert skipped == {"Mesh", "Secret", "GlobalSecret", "Config"}


@pytest.mark.parametrize(
    ("key", "field"),
    [
        (ResourceKey("Nope", None, "a"), "key.type"),
        (ResourceKey("Mesh", "default", "a"), "key.mesh"),
        (ResourceKey("Dataplane", None, "a"), "key.mesh"),
        (ResourceKey("Mesh", None, ""), "key.name"),
        (ResourceKey("Mesh", None, "has space"), "key.name"),
        (ResourceKey("Mesh", None, "x" * (MAX_NAME_LENGTH + 1)), "key.name"),
        (ResourceKey("Dataplane", "", "a"), "key.mesh"),
    ],
)
def test_catalog_refuses_bad_keys_naming_the_field(key, field):
    with pytest.raises(ValidationError) as info:
        DEFAULT_CATALOG.validate_key(key)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_catalog_accepts_application_types_once():
    widget = ResourceType(name="Widget", scope=Scope.MESH, flags=SyncFlag.GLOBAL_TO_ZONES)
    catalog = DEFAULT_CATALOG.with_types(widget)
    assert catalog["Widget"] is widget
    assert "Widget" not in DEFAULT_CATALOG
    assert len(catalog) == len(DEFAULT_CATALOG) + 1
    with pytest.raises(ValueError, match="Widget"):
        catalog.with_types(widget)
    with pytest.raises(ValueError, match="twice"):
        Catalog.of([widget, widget])


def test_spec_validator_names_the_field():
    with pytest.raises(ValidationError) as info:
        DEFAULT_CATALOG["Zone"].validate_spec({"enabled": "yes"})
    assert info.value.field == "spec.enabled"
    # Integers are not booleans and booleans are not integers.
    check = optional_fields(port=int, enabled=bool)
    with pytest.raises(ValidationError, match=r"spec\.port"):
        check({"port": True})
    with pytest.raises(ValidationError, match=r"spec\.enabled"):
        check({"enabled": 1})
    check({"port": 5685, "enabled": False, "other": object()})


def test_spec_must_be_a_mapping_with_string_keys():
    mesh = DEFAULT_CATALOG["Mesh"]
    with pytest.raises(ValidationError, match="must be a mapping"):
        mesh.validate_spec([1, 2])
    with pytest.raises(ValidationError, match="keys must be strings"):
        mesh.validate_spec({1: "a"})


def test_keys_order_with_global_scope_first():
    keys = [
        ResourceKey("Mesh", "b", "x"),
        ResourceKey("Mesh", None, "z"),
        ResourceKey("Mesh", "a", "y"),
        ResourceKey("Dataplane", "a", "y"),
    ]
    assert sorted(keys) == [keys[3], keys[1], keys[2], keys[0]]
    assert str(keys[1]) == "Mesh/z"
    assert str(keys[3]) == "Dataplane/a/y"
