"""How resources become Kubernetes objects (kds.k8s), without a cluster."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kds.catalog import DEFAULT_CATALOG
from kds.errors import ConfigError, ValidationError
from kds.k8s import (
    crd_manifest,
    crd_manifests,
    digest,
    from_object,
    is_label,
    object_name,
    plural,
    to_object,
)
from kds.resource import Resource, ResourceKey, ResourceType, Scope
from kds.testing import strategies as kst

DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def test_plurals_are_kumas():
    assert [plural(name) for name in ("Mesh", "ZoneIngress", "MeshRetry", "MeshTimeout")] == [
        "meshes",
        "zoneingresses",
        "meshretries",
        "meshtimeouts",
    ]


@pytest.mark.parametrize("name", ["mesh", "Mesh-Timeout", "Mesh_1", "M" * 62, ""])
def test_a_type_name_that_cannot_be_a_kind_is_a_config_error(name):
    with pytest.raises(ConfigError, match="cannot be a Kubernetes kind"):
        plural(name)


def test_every_catalog_type_has_a_crd_named_plural_dot_group():
    manifests = crd_manifests(DEFAULT_CATALOG, group="example.io")
    assert [m["metadata"]["name"] for m in manifests] == [
        f"{plural(t.name)}.example.io" for t in DEFAULT_CATALOG
    ]
    mesh_scoped = crd_manifest(DEFAULT_CATALOG["MeshTimeout"])
    columns = mesh_scoped["spec"]["versions"][0]["additionalPrinterColumns"]
    assert columns[0]["jsonPath"] == ".mesh"
    with pytest.raises(ConfigError, match="DNS subdomain"):
        crd_manifest(DEFAULT_CATALOG["Mesh"], group="Not_A_Group")


@given(keys=st.lists(kst.resource_keys(), min_size=2, max_size=2, unique=True))
def test_object_names_are_dns_subdomains_and_differ_for_different_keys(keys):
    names = [object_name(key) for key in keys]
    for name in names:
        assert len(name) <= 253
        assert DNS_SUBDOMAIN.fullmatch(name), name
    if keys[0].type == keys[1].type:
        assert names[0] != names[1]


def test_a_plain_global_name_is_kept_and_anything_else_is_hashed():
    assert object_name(ResourceKey("Mesh", None, "default")) == "default"
    hashed = object_name(ResourceKey("MeshTimeout", "default", "timeout"))
    assert hashed.startswith("timeout.default-")
    assert object_name(ResourceKey("Mesh", None, "Big_Mesh")).startswith("big-mesh-")


def test_kubernetes_label_syntax():
    assert is_label("kuma.io/zone", "zone-1")
    assert is_label("team", "")
    assert not is_label("kuma.io/display-name", "has space")
    assert not is_label("Not_A.Prefix/x", "v")
    assert not is_label("k", "v" * 64)


def _resource(spec, labels=None):
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    return Resource(
        key=ResourceKey("MeshTimeout", "default", "t/1"),
        labels=labels or {"kuma.io/origin": "global", "odd label": "a b"},
        spec=spec,
        version=3,
        created_at=moment,
        modified_at=moment,
    )


@pytest.mark.parametrize(
    ("spec", "readable"),
    [
        ({"a": [1, "x", None, True, 2.5]}, True),
        ({"timeout": 1.0}, False),  # the API server writes 1.0 back as 1
        ({"blob": b"\x00\x01"}, False),
        ({"n": 2**63}, False),  # past int64, still a msgpack uint64
    ],
)
def test_a_resource_survives_the_object_form(spec, readable):
    resource = _resource(spec)
    resource_type = DEFAULT_CATALOG["MeshTimeout"]
    obj = to_object(resource, resource_type, content_digest="d")
    assert ("encodedSpec" not in obj) == readable
    # Through JSON, as the API server stores and returns it.
    back = from_object(json.loads(json.dumps(obj)), DEFAULT_CATALOG)
    assert back == resource
    assert obj["metadata"]["labels"] == {"kuma.io/origin": "global"}
    assert obj["mesh"] == "default"


def test_an_object_kds_did_not_write_is_read_from_its_own_metadata():
    obj = {
        "kind": "Mesh",
        "metadata": {
            "name": "default",
            "labels": {"team": "a"},
            "generation": 4,
            "creationTimestamp": "2026-01-02T03:04:05Z",
        },
        "spec": {"mtls": {}},
    }
    resource = from_object(obj, DEFAULT_CATALOG)
    assert (resource.key, resource.labels, resource.version) == (
        ResourceKey("Mesh", None, "default"),
        {"team": "a"},
        4,
    )


def test_malformed_kds_annotations_name_the_field():
    obj = to_object(_resource({}), DEFAULT_CATALOG["MeshTimeout"], content_digest="d")
    obj["metadata"]["annotations"]["kds.kuma.io/version"] = "three"
    with pytest.raises(ValidationError, match=r"metadata\.annotations"):
        from_object(obj, DEFAULT_CATALOG)


def test_the_digest_depends_on_labels_and_spec_separately():
    labels, spec = msgpack.packb({"a": "b"}), msgpack.packb({})
    assert digest(labels, spec) != digest(labels + spec, b"")
    assert digest(labels, spec) == digest(labels, spec)


def test_a_custom_global_type_gets_a_namespaced_crd():
    custom = ResourceType(name="FeatureFlag", scope=Scope.GLOBAL)
    manifest = crd_manifest(custom)
    assert manifest["spec"]["scope"] == "Namespaced"
    assert manifest["spec"]["names"]["plural"] == "featureflags"
    assert "mesh" not in manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
