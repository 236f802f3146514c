"""The Kubernetes API stand-in, driven through the real kubernetes_asyncio client."""

from __future__ import annotations

import itertools
import json
import ssl
import stat
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import httpx
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client import ApiClient, ApiException, Configuration

from kds.testing.kubeapi import GIT_VERSION, KubeApiServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

pytestmark = pytest.mark.anyio

GROUP = "kds.example.com"
DEADLINE = 20.0  # seconds for anything that should take milliseconds
_serial = itertools.count()


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeApiServer]:
    with KubeApiServer() as server:
        yield server


async def _client(kube: KubeApiServer) -> ApiClient:
    cfg = Configuration()
    await config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=cfg)
    return ApiClient(cfg)


@pytest.fixture
async def api(kube: KubeApiServer) -> AsyncIterator[ApiClient]:
    async with await _client(kube) as api_client:
        yield api_client


def _unique(prefix: str) -> str:
    return f"{prefix}{next(_serial)}"


def as_body(value: dict[str, Any]) -> Any:
    """A plain dict where the client's signature names a model: it sends dicts as they are."""
    return value


def crd_body(
    plural: str,
    kind: str,
    *,
    scope: str = "Namespaced",
    versions: tuple[str, ...] = ("v1",),
    status: bool = False,
) -> Any:
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {"plural": plural, "singular": plural[:-1], "kind": kind},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": index == 0,
                    "schema": schema,
                    **({"subresources": {"status": {}}} if status else {}),
                }
                for index, version in enumerate(versions)
            ],
        },
    }


async def new_type(api: ApiClient, **options: Any) -> tuple[str, str]:
    """Register a new custom type; returns its plural and kind."""
    serial = next(_serial)
    plural, kind = f"widgets{serial}", f"Widget{serial}"
    await client.ApiextensionsV1Api(api).create_custom_resource_definition(
        crd_body(plural, kind, **options)
    )
    return plural, kind


async def new_namespace(api: ApiClient) -> str:
    name = _unique("ns")
    await client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    )
    return name


def widget(
    kind: str,
    name: str,
    *,
    labels: dict[str, str] | None = None,
    spec: dict[str, Any] | None = None,
    version: str = "v1",
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if labels is not None:
        metadata["labels"] = labels
    return {
        "apiVersion": f"{GROUP}/{version}",
        "kind": kind,
        "metadata": metadata,
        "spec": spec if spec is not None else {"size": 1},
    }


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def status_of(error: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    assert error.value.body is not None
    body: dict[str, Any] = json.loads(error.value.body)
    assert body["kind"] == "Status"
    assert body["code"] == error.value.status
    return body


async def collect(
    stream: watch.Watch, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Read watch events until *done* says enough (or the stream ends)."""
    events: list[dict[str, Any]] = []
    with anyio.fail_after(DEADLINE):
        async for event in stream:
            events.append(event)
            if done(events):
                break
    return events


async def watch_objects(
    custom: client.CustomObjectsApi,
    namespace: str,
    plural: str,
    resource_version: str,
    done: Callable[[list[dict[str, Any]]], bool],
) -> list[dict[str, Any]]:
    """Watch *plural* in *namespace* from *resource_version* until *done* says enough."""
    async with watch.Watch() as stream:
        return await collect(
            stream.stream(
                custom.list_namespaced_custom_object,
                GROUP,
                "v1",
                namespace,
                plural,
                resource_version=resource_version,
                timeout_seconds=60,
            ),
            done,
        )


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(type, name, revision) of the events that are not bookmarks."""
    return [
        (e["type"], e["raw_object"]["metadata"]["name"], rv(e["raw_object"]))
        for e in events
        if e["type"] != "BOOKMARK"
    ]


def bookmarked(revision: int) -> Callable[[list[dict[str, Any]]], bool]:
    def done(events: list[dict[str, Any]]) -> bool:
        last = events[-1]
        return last["type"] == "BOOKMARK" and rv(last["raw_object"]) >= revision

    return done


async def test_server_files_discovery_and_starting_namespaces(kube, api):
    assert kube.url.startswith("https://127.0.0.1:")
    assert kube.token
    assert kube.ca_file is not None
    assert kube.pid is not None
    for path in (kube.kubeconfig, kube.directory / "tls.key", kube.directory / "token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    version = await client.VersionApi(api).get_code()
    assert version.git_version == GIT_VERSION
    groups = await client.ApisApi(api).get_api_versions()
    assert "apiextensions.k8s.io" in [group.name for group in groups.groups]
    core = client.CoreV1Api(api)
    system = await core.read_namespace("kube-system")
    default = await core.read_namespace("default")
    assert system.metadata.uid
    assert default.metadata.uid
    assert system.metadata.uid != default.metadata.uid
    assert system.status.phase == "Active"
    names = [ns.metadata.name for ns in (await core.list_namespace()).items]
    assert {"default", "kube-system"} <= set(names)
    state = await anyio.to_thread.run_sync(kube.state)
    assert state["revision"] >= 1000
    assert state["compacted"] <= state["revision"]


async def test_crd_is_established_and_custom_objects_have_full_crud(api):
    extensions = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    plural, kind = _unique("gadgets"), _unique("Gadget")
    created_crd = await extensions.create_custom_resource_definition(crd_body(plural, kind))
    conditions = {c.type: c.status for c in created_crd.status.conditions}
    assert conditions == {"Established": "True", "NamesAccepted": "True"}
    assert created_crd.status.accepted_names.plural == plural
    assert created_crd.metadata.uid
    assert created_crd.metadata.creation_timestamp is not None
    listed = await extensions.list_custom_resource_definition()
    assert f"{plural}.{GROUP}" in [crd.metadata.name for crd in listed.items]
    resources = await custom.get_api_resources(GROUP, "v1")
    assert plural in [r.name for r in resources.resources]

    ns = await new_namespace(api)
    created = await custom.create_namespaced_custom_object(
        GROUP, "v1", ns, plural, widget(kind, "one", labels={"app": "a"})
    )
    meta = created["metadata"]
    assert meta["namespace"] == ns
    assert meta["generation"] == 1
    assert meta["uid"]
    assert meta["creationTimestamp"].endswith("Z")
    got = await custom.get_namespaced_custom_object(GROUP, "v1", ns, plural, "one")
    assert got == created

    # A label change is a write but not a new generation; a spec change is both.
    got["metadata"]["labels"] = {"app": "b"}
    relabelled = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "one", got)
    assert rv(relabelled) > rv(created)
    assert relabelled["metadata"]["generation"] == 1
    assert relabelled["metadata"]["uid"] == meta["uid"]
    assert relabelled["metadata"]["creationTimestamp"] == meta["creationTimestamp"]
    relabelled["spec"] = {"size": 2}
    resized = await custom.replace_namespaced_custom_object(
        GROUP, "v1", ns, plural, "one", relabelled
    )
    assert resized["metadata"]["generation"] == 2
    assert resized["spec"] == {"size": 2}

    # Replacing with the same content changes nothing, not even the revision.
    same = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "one", resized)
    assert same == resized

    listed_objects = await custom.list_namespaced_custom_object(GROUP, "v1", ns, plural)
    assert listed_objects["kind"] == f"{kind}List"
    assert [item["metadata"]["name"] for item in listed_objects["items"]] == ["one"]
    everywhere = await custom.list_cluster_custom_object(GROUP, "v1", plural)
    assert [item["metadata"]["namespace"] for item in everywhere["items"]] == [ns]

    deleted = await custom.delete_namespaced_custom_object(GROUP, "v1", ns, plural, "one")
    assert deleted["metadata"]["uid"] == meta["uid"]
    assert rv(deleted) > rv(resized)
    with pytest.raises(ApiException) as missing:
        await custom.get_namespaced_custom_object(GROUP, "v1", ns, plural, "one")
    assert missing.value.status == 404


async def test_invalid_crds_are_refused_and_duplicates_conflict(api):
    extensions = client.ApiextensionsV1Api(api)
    plural = _unique("things")

    def broken(change: Callable[[dict[str, Any]], None]) -> Any:
        body = crd_body(plural, "Thing")
        change(body)
        return body

    def two_storage_versions(body):
        body["spec"]["versions"].append({**body["spec"]["versions"][0], "name": "v2"})

    cases = {
        "metadata.name": broken(lambda b: b["metadata"].update(name=f"other.{GROUP}")),
        "spec.names.plural": broken(lambda b: b["spec"]["names"].update(plural="Things")),
        "spec.scope": broken(lambda b: b["spec"].update(scope="Global")),
        "spec.versions": broken(two_storage_versions),
        "spec.versions[0].schema.openAPIV3Schema": broken(
            lambda b: b["spec"]["versions"][0].pop("schema")
        ),
        "spec.names.kind": broken(lambda b: b["spec"]["names"].pop("kind")),
    }
    for field_name, body in cases.items():
        with pytest.raises(ApiException) as invalid:
            await extensions.create_custom_resource_definition(body)
        status = status_of(invalid)
        assert invalid.value.status == 422, field_name
        assert status["reason"] == "Invalid"
        assert field_name in [cause["field"] for cause in status["details"]["causes"]]
    body = crd_body(plural, "Thing")
    await extensions.create_custom_resource_definition(body)
    with pytest.raises(ApiException) as duplicate:
        await extensions.create_custom_resource_definition(body)
    assert duplicate.value.status == 409
    assert status_of(duplicate)["reason"] == "AlreadyExists"


async def test_replace_with_a_stale_resource_version_conflicts(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    first = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "w"))
    first["spec"] = {"size": 2}
    second = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "w", first)
    first["spec"] = {"size": 3}  # still carries the first resourceVersion
    with pytest.raises(ApiException) as stale:
        await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "w", first)
    status = status_of(stale)
    assert stale.value.status == 409
    assert status["reason"] == "Conflict"
    assert status["message"] == (
        f'Operation cannot be fulfilled on {plural}.{GROUP} "w": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    # Without a resourceVersion the replacement is unconditional.
    del first["metadata"]["resourceVersion"]
    third = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "w", first)
    assert rv(third) > rv(second)
    assert third["spec"] == {"size": 3}
    with pytest.raises(ApiException) as missing:
        await custom.replace_namespaced_custom_object(
            GROUP, "v1", ns, plural, "nope", widget(kind, "nope")
        )
    assert missing.value.status == 404


async def test_delete_preconditions_conflict_when_they_do_not_hold(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    created = await custom.create_namespaced_custom_object(
        GROUP, "v1", ns, plural, widget(kind, "w")
    )
    for preconditions in (
        {"resourceVersion": str(rv(created) - 1)},
        {"uid": "00000000-0000-0000-0000-000000000000"},
    ):
        with pytest.raises(ApiException) as failed:
            await custom.delete_namespaced_custom_object(
                GROUP, "v1", ns, plural, "w", body=as_body({"preconditions": preconditions})
            )
        assert failed.value.status == 409
        assert "Precondition failed" in status_of(failed)["message"]
    deleted = await custom.delete_namespaced_custom_object(
        GROUP,
        "v1",
        ns,
        plural,
        "w",
        body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(
                resource_version=created["metadata"]["resourceVersion"],
                uid=created["metadata"]["uid"],
            )
        ),
    )
    assert deleted["metadata"]["name"] == "w"
    with pytest.raises(ApiException) as gone:
        await custom.delete_namespaced_custom_object(GROUP, "v1", ns, plural, "w")
    assert gone.value.status == 404


async def test_not_found_and_invalid_objects_are_kubernetes_statuses(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    with pytest.raises(ApiException) as missing:
        await custom.get_namespaced_custom_object(GROUP, "v1", ns, plural, "absent")
    status = status_of(missing)
    assert (missing.value.status, status["reason"]) == (404, "NotFound")
    assert status["details"] == {"name": "absent", "group": GROUP, "kind": plural}
    assert status["message"] == f'{plural}.{GROUP} "absent" not found'

    with pytest.raises(ApiException) as unregistered:
        await custom.list_namespaced_custom_object(GROUP, "v1", ns, "unregistered")
    assert unregistered.value.status == 404
    with pytest.raises(ApiException) as unserved:
        await custom.list_namespaced_custom_object(GROUP, "v9", ns, plural)
    assert unserved.value.status == 404
    with pytest.raises(ApiException) as no_namespace:
        await custom.create_namespaced_custom_object(
            GROUP, "v1", "no-such-namespace", plural, widget(kind, "w")
        )
    assert no_namespace.value.status == 404
    assert status_of(no_namespace)["details"]["kind"] == "namespaces"

    too_big = {"big": "x" * (256 * 1024)}
    invalid_bodies = {
        "metadata.name": widget(kind, "Not_A_Name"),
        "metadata.labels": widget(kind, "w", labels={"bad key!": "v"}),
        "metadata.labels[app]": widget(kind, "w", labels={"app": "-bad-"}),
        "kind": {**widget(kind, "w"), "kind": "Other"},
        "apiVersion": {**widget(kind, "w"), "apiVersion": f"{GROUP}/v2"},
        "metadata.namespace": {
            **widget(kind, "w"),
            "metadata": {"name": "w", "namespace": "elsewhere"},
        },
        "metadata.annotations": {
            **widget(kind, "w"),
            "metadata": {"name": "w", "annotations": too_big},
        },
    }
    for field_name, body in invalid_bodies.items():
        with pytest.raises(ApiException) as invalid:
            await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, body)
        status = status_of(invalid)
        assert (invalid.value.status, status["reason"]) == (422, "Invalid"), field_name
        assert field_name in [cause["field"] for cause in status["details"]["causes"]]
    # Long but valid names and labels are fine.
    long_name = ".".join(["a" * 63] * 3) + "." + "b" * 61
    assert len(long_name) == 253
    await custom.create_namespaced_custom_object(
        GROUP,
        "v1",
        ns,
        plural,
        widget(kind, long_name, labels={"example.com/" + "k" * 63: "V.a-l_ue"}),
    )
    with pytest.raises(ApiException) as exists:
        await custom.create_namespaced_custom_object(
            GROUP, "v1", ns, plural, widget(kind, long_name)
        )
    assert (exists.value.status, status_of(exists)["reason"]) == (409, "AlreadyExists")
    with pytest.raises(ApiException) as patched:
        await custom.patch_namespaced_custom_object(
            GROUP, "v1", ns, plural, long_name, {"spec": {"size": 5}}
        )
    assert (patched.value.status, status_of(patched)["reason"]) == (405, "MethodNotAllowed")


async def test_requests_without_the_token_are_unauthorized(kube):
    for token in ("wrong", None):
        cfg = Configuration()
        await config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=cfg)
        if token is None:
            cfg.api_key.clear()
        else:
            cfg.api_key["BearerToken"] = f"Bearer {token}"
        async with ApiClient(cfg) as api:
            with pytest.raises(ApiException) as refused:
                await client.CoreV1Api(api).list_namespace()
        assert (refused.value.status, status_of(refused)["reason"]) == (401, "Unauthorized")


async def test_malformed_oversized_and_unknown_requests(kube, api):
    plural, _ = await new_type(api)
    assert kube.ca_file is not None
    async with httpx.AsyncClient(
        base_url=kube.url,
        headers={"Authorization": f"Bearer {kube.token}"},
        verify=ssl.create_default_context(cafile=str(kube.ca_file)),
    ) as raw:
        path = f"/apis/{GROUP}/v1/namespaces/default/{plural}"
        malformed = await raw.post(path, content=b"{not json")
        assert (malformed.status_code, malformed.json()["reason"]) == (400, "BadRequest")
        oversized = await raw.post(path, content=b" " * (3 * 1024 * 1024 + 1))
        assert oversized.status_code == 413
        assert oversized.json()["reason"] == "RequestEntityTooLarge"
        unknown = await raw.get("/no/such/path")
        assert (unknown.status_code, unknown.json()["reason"]) == (404, "NotFound")
        bad_selector = await raw.get(path, params={"labelSelector": "a in (b"})
        assert (bad_selector.status_code, bad_selector.json()["reason"]) == (400, "BadRequest")


async def test_label_and_field_selectors(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    labels = {
        "a": {"app": "web", "tier": "front"},
        "b": {"app": "web", "tier": "back"},
        "c": {"app": "db"},
        "d": {},
    }
    for name, object_labels in labels.items():
        await custom.create_namespaced_custom_object(
            GROUP, "v1", ns, plural, widget(kind, name, labels=object_labels)
        )

    async def names(label_selector: str = "", field_selector: str = "") -> list[str]:
        listed = await custom.list_namespaced_custom_object(
            GROUP, "v1", ns, plural, label_selector=label_selector, field_selector=field_selector
        )
        return [item["metadata"]["name"] for item in listed["items"]]

    assert await names(label_selector="app=web") == ["a", "b"]
    assert await names(label_selector="app==web,tier=back") == ["b"]
    assert await names(label_selector="app!=web") == ["c", "d"]
    assert await names(label_selector="tier in (front, back)") == ["a", "b"]
    assert await names(label_selector="tier notin (front)") == ["b", "c", "d"]
    assert await names(label_selector="tier") == ["a", "b"]
    assert await names(label_selector="!tier") == ["c", "d"]
    assert await names(label_selector="") == ["a", "b", "c", "d"]
    assert await names(field_selector="metadata.name=c") == ["c"]
    assert await names(field_selector="metadata.name!=c,metadata.name!=d") == ["a", "b"]
    assert await names(field_selector=f"metadata.namespace=={ns}") == ["a", "b", "c", "d"]
    for selector in ("app in (web", "=web", "app=web,", "a b", "app=-x-", "tier notin ()"):
        with pytest.raises(ApiException) as malformed:
            await names(label_selector=selector)
        assert (malformed.value.status, status_of(malformed)["reason"]) == (400, "BadRequest")
    with pytest.raises(ApiException) as unsupported:
        await names(field_selector="spec.size=1")
    assert unsupported.value.status == 400


async def test_paginated_list_keeps_returning_the_first_page_s_revision(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    for index in range(7):
        await custom.create_namespaced_custom_object(
            GROUP, "v1", ns, plural, widget(kind, f"w{index}")
        )
    first = await custom.list_namespaced_custom_object(GROUP, "v1", ns, plural, limit=3)
    at = first["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in first["items"]] == ["w0", "w1", "w2"]
    assert first["metadata"]["remainingItemCount"] == 4
    # Writes after the first page do not show in the later ones.
    await custom.delete_namespaced_custom_object(GROUP, "v1", ns, plural, "w4")
    await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "w9"))
    names = [i["metadata"]["name"] for i in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = await custom.list_namespaced_custom_object(
            GROUP, "v1", ns, plural, limit=3, _continue=token
        )
        assert page["metadata"]["resourceVersion"] == at
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"w{index}" for index in range(7)]


async def test_exact_list_returns_the_past_state_until_compacted(kube, api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    a = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "a"))
    await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "b"))
    then = (await custom.list_namespaced_custom_object(GROUP, "v1", ns, plural))["metadata"][
        "resourceVersion"
    ]
    a["spec"] = {"size": 9}
    await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "a", a)
    await custom.delete_namespaced_custom_object(GROUP, "v1", ns, plural, "b")
    await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "c"))

    past = await custom.list_namespaced_custom_object(
        GROUP, "v1", ns, plural, resource_version=then, resource_version_match="Exact"
    )
    assert past["metadata"]["resourceVersion"] == then
    assert [(i["metadata"]["name"], i["spec"]["size"]) for i in past["items"]] == [
        ("a", 1),
        ("b", 1),
    ]
    now = await custom.list_namespaced_custom_object(
        GROUP, "v1", ns, plural, resource_version=then, resource_version_match="NotOlderThan"
    )
    assert int(now["metadata"]["resourceVersion"]) > int(then)
    assert [(i["metadata"]["name"], i["spec"]["size"]) for i in now["items"]] == [
        ("a", 9),
        ("c", 1),
    ]
    with pytest.raises(ApiException) as ahead:
        await custom.list_namespaced_custom_object(
            GROUP, "v1", ns, plural, resource_version=str(10**12), resource_version_match="Exact"
        )
    assert ahead.value.status == 504

    compacted = await anyio.to_thread.run_sync(kube.compact)
    assert compacted >= int(now["metadata"]["resourceVersion"])
    with pytest.raises(ApiException) as expired:
        await custom.list_namespaced_custom_object(
            GROUP, "v1", ns, plural, resource_version=then, resource_version_match="Exact"
        )
    status = status_of(expired)
    assert (expired.value.status, status["reason"]) == (410, "Expired")
    assert status["message"] == f"too old resource version: {then} ({compacted})"


async def test_watch_from_a_revision_replays_later_events_in_order_then_bookmarks(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    before = await custom.create_namespaced_custom_object(
        GROUP, "v1", ns, plural, widget(kind, "early")
    )
    start = rv(before)
    a = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "a"))
    a["spec"] = {"size": 2}
    a2 = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "a", a)
    b = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "b"))
    gone = await custom.delete_namespaced_custom_object(GROUP, "v1", ns, plural, "early")
    # Another type's write moves the revision past this collection's last event.
    other_plural, other_kind = await new_type(api)
    await custom.create_namespaced_custom_object(
        GROUP, "v1", ns, other_plural, widget(other_kind, "elsewhere")
    )
    head = int(
        (await custom.list_namespaced_custom_object(GROUP, "v1", ns, other_plural))["metadata"][
            "resourceVersion"
        ]
    )
    async with watch.Watch() as stream:
        events = await collect(
            stream.stream(
                custom.list_namespaced_custom_object,
                GROUP,
                "v1",
                ns,
                plural,
                resource_version=str(start),
                allow_watch_bookmarks=True,
                timeout_seconds=60,
            ),
            bookmarked(head),
        )
        assert summary(events) == [
            ("ADDED", "a", rv(a)),
            ("MODIFIED", "a", rv(a2)),
            ("ADDED", "b", rv(b)),
            ("DELETED", "early", rv(gone)),
        ]
        # Bookmarks never claim a revision below an event still to come.
        seen = 0
        for event in events:
            assert rv(event["raw_object"]) >= seen
            seen = rv(event["raw_object"])
        bookmark = events[-1]["raw_object"]
        assert bookmark["kind"] == kind
        assert bookmark["apiVersion"] == f"{GROUP}/v1"

        # Live events follow, then a bookmark once the revision moves elsewhere.
        live = await custom.create_namespaced_custom_object(
            GROUP, "v1", ns, plural, widget(kind, "live")
        )
        more = await custom.create_namespaced_custom_object(
            GROUP, "v1", ns, other_plural, widget(other_kind, "more")
        )
        later = await collect(stream, bookmarked(rv(more)))
        assert summary(later) == [("ADDED", "live", rv(live))]


async def test_watch_without_a_revision_starts_with_the_current_state(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    for name in ("b", "a"):
        await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, name))
    async with watch.Watch() as stream:
        events = stream.stream(
            custom.list_namespaced_custom_object, GROUP, "v1", ns, plural, timeout_seconds=60
        )
        initial = await collect(events, lambda seen: len(seen) == 2)
        assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in initial] == [
            ("ADDED", "a"),
            ("ADDED", "b"),
        ]
        live = await custom.create_namespaced_custom_object(
            GROUP, "v1", ns, plural, widget(kind, "c")
        )
        assert summary(await collect(events, lambda seen: True)) == [("ADDED", "c", rv(live))]


async def test_watch_selection_turns_updates_into_added_and_deleted(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    obj = await custom.create_namespaced_custom_object(
        GROUP, "v1", ns, plural, widget(kind, "w", labels={"on": "no"})
    )
    start = rv(obj)
    obj["metadata"]["labels"] = {"on": "yes"}
    joined = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "w", obj)
    joined["metadata"]["labels"] = {"on": "no"}
    left = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "w", joined)
    async with watch.Watch() as stream:
        events = await collect(
            stream.stream(
                custom.list_namespaced_custom_object,
                GROUP,
                "v1",
                ns,
                plural,
                resource_version=str(start),
                label_selector="on=yes",
                timeout_seconds=60,
            ),
            lambda seen: len(seen) == 2,
        )
    assert summary(events) == [("ADDED", "w", rv(joined)), ("DELETED", "w", rv(left))]


async def test_watch_below_the_compaction_revision_raises_410(kube, api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    old = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "w"))
    await custom.delete_namespaced_custom_object(GROUP, "v1", ns, plural, "w")
    compacted = await anyio.to_thread.run_sync(kube.compact)
    async with watch.Watch() as stream:
        with pytest.raises(ApiException) as expired:
            await collect(
                stream.stream(
                    custom.list_namespaced_custom_object,
                    GROUP,
                    "v1",
                    ns,
                    plural,
                    resource_version=str(rv(old)),
                ),
                lambda seen: True,
            )
    assert expired.value.status == 410
    assert f"too old resource version: {rv(old)} ({compacted})" in str(expired.value.reason)


async def test_watch_timeout_ends_the_stream_after_a_last_bookmark(api):
    custom = client.CustomObjectsApi(api)
    plural, _ = await new_type(api)
    ns = await new_namespace(api)
    listed = await custom.list_namespaced_custom_object(GROUP, "v1", ns, plural)
    at = int(listed["metadata"]["resourceVersion"])
    for bookmarks in (False, True):
        async with watch.Watch() as stream:
            events = await collect(
                stream.stream(
                    custom.list_namespaced_custom_object,
                    GROUP,
                    "v1",
                    ns,
                    plural,
                    resource_version=str(at),
                    allow_watch_bookmarks=bookmarks,
                    timeout_seconds=1,
                ),
                lambda seen: False,
            )
        # Nothing happened to the type: at most the bookmark sent before the end.
        assert all(event["type"] == "BOOKMARK" for event in events)
        if bookmarks:
            assert events
            assert rv(events[-1]["raw_object"]) >= at
        else:
            assert events == []


async def test_close_watches_ends_every_stream(kube, api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    obj = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "w"))
    opened: list[anyio.Event] = []
    ended = 0

    async def watch_until_closed(first_event: anyio.Event) -> None:
        nonlocal ended
        async with watch.Watch() as stream:
            events = stream.stream(
                custom.list_namespaced_custom_object,
                GROUP,
                "v1",
                ns,
                plural,
                resource_version=str(rv(obj) - 1),
                timeout_seconds=600,  # a Watch without a timeout would reconnect
            )
            await collect(events, lambda seen: True)  # the stream is open
            first_event.set()
            await collect(events, lambda seen: False)
        ended += 1

    async with anyio.create_task_group() as group:
        for _ in range(3):
            opened.append(anyio.Event())
            group.start_soon(watch_until_closed, opened[-1])
        with anyio.fail_after(DEADLINE):
            for event in opened:
                await event.wait()
        assert await anyio.to_thread.run_sync(kube.close_watches) >= 3
    assert ended == 3
    assert (await anyio.to_thread.run_sync(kube.state))["watches"] == 0


async def test_delete_answers_with_the_revision_of_the_deleted_event(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    created = await custom.create_namespaced_custom_object(
        GROUP, "v1", ns, plural, widget(kind, "w")
    )
    deleted = await custom.delete_namespaced_custom_object(GROUP, "v1", ns, plural, "w")
    assert rv(deleted) > rv(created)
    events = await watch_objects(custom, ns, plural, str(rv(created)), lambda seen: True)
    assert events[0]["type"] == "DELETED"
    assert events[0]["raw_object"] == deleted


async def test_deleting_a_namespace_deletes_its_objects(api):
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns, other = await new_namespace(api), await new_namespace(api)
    for name in ("x", "y"):
        await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, name))
    kept = await custom.create_namespaced_custom_object(
        GROUP, "v1", other, plural, widget(kind, "x")
    )
    config_map = await core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"), data={"k": "v"})
    )
    start = rv(kept)
    answer = await core.delete_namespace(ns)
    assert answer.kind == "Namespace"
    with pytest.raises(ApiException) as missing:
        await core.read_namespace(ns)
    assert missing.value.status == 404
    everywhere = await custom.list_cluster_custom_object(GROUP, "v1", plural)
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]] == [
        (other, "x")
    ]
    with pytest.raises(ApiException) as no_config:
        await core.read_namespaced_config_map("settings", ns)
    assert no_config.value.status == 404
    async with watch.Watch() as stream:
        events = await collect(
            stream.stream(
                custom.list_cluster_custom_object,
                GROUP,
                "v1",
                plural,
                resource_version=str(start),
                timeout_seconds=60,
            ),
            lambda seen: len(seen) == 2,
        )
    assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events] == [
        ("DELETED", "x"),
        ("DELETED", "y"),
    ]
    assert all(e["raw_object"]["metadata"]["namespace"] == ns for e in events)
    assert config_map.metadata.uid
    with pytest.raises(ApiException) as protected:
        await core.delete_namespace("kube-system")
    assert protected.value.status == 403


async def test_deleting_a_definition_deletes_its_objects_and_ends_its_watches(api):
    extensions = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    obj = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "w"))
    async with watch.Watch() as stream:
        events = stream.stream(
            custom.list_namespaced_custom_object,
            GROUP,
            "v1",
            ns,
            plural,
            resource_version=str(rv(obj) - 1),
            timeout_seconds=60,
        )
        opened = await collect(events, lambda seen: True)
        assert summary(opened) == [("ADDED", "w", rv(obj))]
        crd = await extensions.delete_custom_resource_definition(f"{plural}.{GROUP}")
        assert crd.kind == "CustomResourceDefinition"  # typed as a Status, holds the definition
        seen = await collect(events, lambda seen: False)  # ends with the type
    assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in seen] == [("DELETED", "w")]
    with pytest.raises(ApiException) as unregistered:
        await custom.list_namespaced_custom_object(GROUP, "v1", ns, plural)
    assert unregistered.value.status == 404
    # Registered again, the type starts empty.
    await extensions.create_custom_resource_definition(crd_body(plural, kind))
    again = await custom.list_namespaced_custom_object(GROUP, "v1", ns, plural)
    assert again["items"] == []


async def test_cluster_scoped_types(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api, scope="Cluster")
    created = await custom.create_cluster_custom_object(GROUP, "v1", plural, widget(kind, "c"))
    assert "namespace" not in created["metadata"]
    got = await custom.get_cluster_custom_object(GROUP, "v1", plural, "c")
    assert got == created
    got["spec"] = {"size": 4}
    replaced = await custom.replace_cluster_custom_object(GROUP, "v1", plural, "c", got)
    assert replaced["metadata"]["generation"] == 2
    listed = await custom.list_cluster_custom_object(GROUP, "v1", plural)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["c"]
    with pytest.raises(ApiException) as namespaced:
        await custom.list_namespaced_custom_object(GROUP, "v1", "default", plural)
    assert namespaced.value.status == 404
    deleted = await custom.delete_cluster_custom_object(GROUP, "v1", plural, "c")
    assert rv(deleted) > rv(replaced)


async def test_configmaps(api):
    core = client.CoreV1Api(api)
    ns = await new_namespace(api)
    created = await core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"a": "1"})
    )
    created.data = {"a": "2"}
    replaced = await core.replace_namespaced_config_map("cm", ns, created)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    with pytest.raises(ApiException) as stale:
        await core.replace_namespaced_config_map("cm", ns, created)
    assert stale.value.status == 409
    assert 'configmaps "cm"' in status_of(stale)["message"]
    with pytest.raises(ApiException) as invalid:
        await core.create_namespaced_config_map(
            ns, as_body({"metadata": {"name": "bad"}, "data": {"no spaces": "x"}})
        )
    assert invalid.value.status == 422
    listed = await core.list_namespaced_config_map(ns)
    assert [cm.data for cm in listed.items] == [{"a": "2"}]
    async with watch.Watch() as stream:
        events = stream.stream(
            core.list_namespaced_config_map,
            ns,
            resource_version=created.metadata.resource_version,
            timeout_seconds=60,
        )
        first = await collect(events, lambda seen: True)
        assert first[0]["type"] == "MODIFIED"
        assert first[0]["object"].data == {"a": "2"}
        status = await core.delete_namespaced_config_map("cm", ns)
        assert status.status == "Success"
        deleted = await collect(events, lambda seen: True)
        assert deleted[0]["type"] == "DELETED"


async def test_versions_and_the_status_subresource(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api, versions=("v1", "v2"), status=True)
    ns = await new_namespace(api)
    obj = widget(kind, "w")
    obj["status"] = {"ready": True}
    created = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, obj)
    assert "status" not in created  # written through the status subresource only
    as_v2 = await custom.get_namespaced_custom_object(GROUP, "v2", ns, plural, "w")
    assert as_v2["apiVersion"] == f"{GROUP}/v2"
    created["status"] = {"ready": True}
    with_status = await custom.replace_namespaced_custom_object_status(
        GROUP, "v1", ns, plural, "w", created
    )
    assert with_status["status"] == {"ready": True}
    assert with_status["metadata"]["generation"] == 1
    with_status["status"] = {"ready": False}
    with_status["spec"] = {"size": 3}
    replaced = await custom.replace_namespaced_custom_object(
        GROUP, "v1", ns, plural, "w", with_status
    )
    assert replaced["status"] == {"ready": True}
    assert replaced["metadata"]["generation"] == 2


async def test_one_revision_counter_and_no_op_replacements_emit_nothing(api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    other_plural, other_kind = await new_type(api)
    ns = await new_namespace(api)
    first = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "w"))
    other = await custom.create_namespaced_custom_object(
        GROUP, "v1", ns, other_plural, widget(other_kind, "w")
    )
    assert rv(other) == rv(first) + 1  # one counter across every type, like etcd's
    same = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "w", first)
    assert same == first
    first["spec"] = {"size": 2}
    changed = await custom.replace_namespaced_custom_object(GROUP, "v1", ns, plural, "w", first)
    events = await watch_objects(custom, ns, plural, str(rv(first)), lambda seen: True)
    assert summary(events) == [("MODIFIED", "w", rv(changed))]


async def test_initial_events_end_with_an_annotated_bookmark(api):
    core = client.CoreV1Api(api)
    ns = await new_namespace(api)
    await core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"k": "v"})
    )
    async with watch.Watch() as stream:
        events = await collect(
            stream.stream(
                core.list_namespaced_config_map,
                ns,
                send_initial_events=True,
                resource_version_match="NotOlderThan",
                allow_watch_bookmarks=True,
                timeout_seconds=60,
            ),
            lambda seen: seen[-1]["type"] == "BOOKMARK",
        )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[0]["object"].data == {"k": "v"}
    annotations = events[-1]["raw_object"]["metadata"]["annotations"]
    assert annotations == {"k8s.io/initial-events-end": "true"}


async def test_a_client_that_goes_away_ends_its_watch(kube, api):
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    obj = await custom.create_namespaced_custom_object(GROUP, "v1", ns, plural, widget(kind, "w"))
    await anyio.to_thread.run_sync(kube.close_watches)  # earlier tests' streams
    async with watch.Watch() as stream:
        await collect(
            stream.stream(
                custom.list_namespaced_custom_object,
                GROUP,
                "v1",
                ns,
                plural,
                resource_version=str(rv(obj) - 1),
                timeout_seconds=600,
            ),
            lambda seen: True,
        )
        assert (await anyio.to_thread.run_sync(kube.state))["watches"] == 1
    with anyio.fail_after(DEADLINE):
        while True:
            if (await anyio.to_thread.run_sync(kube.state))["watches"] == 0:
                break
            await anyio.sleep(0.01)  # the server notices the closed connection by itself


async def test_delete_collection_and_namespace_names(api):
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    plural, kind = await new_type(api)
    ns = await new_namespace(api)
    for name, labels in (("a", {"x": "1"}), ("b", {"x": "1"}), ("c", {"x": "2"})):
        await custom.create_namespaced_custom_object(
            GROUP, "v1", ns, plural, widget(kind, name, labels=labels)
        )
    deleted = await custom.delete_collection_namespaced_custom_object(
        GROUP, "v1", ns, plural, label_selector="x=1"
    )
    assert [item["metadata"]["name"] for item in deleted["items"]] == ["a", "b"]
    left = await custom.list_namespaced_custom_object(GROUP, "v1", ns, plural)
    assert [item["metadata"]["name"] for item in left["items"]] == ["c"]
    with pytest.raises(ApiException) as invalid:
        await core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name="has.dots"))
        )
    assert (invalid.value.status, status_of(invalid)["reason"]) == (422, "Invalid")
    with pytest.raises(ApiException) as exists:
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    assert exists.value.status == 409


async def test_plain_http_without_a_token(api):
    plain = KubeApiServer(tls=False, token=None, initial_revision=5000)
    await anyio.to_thread.run_sync(plain.start)
    try:
        assert plain.url.startswith("http://127.0.0.1:")
        assert plain.ca_file is None
        assert plain.token is None
        async with await _client(plain) as plain_api:
            core = client.CoreV1Api(plain_api)
            namespaces = await core.list_namespace()
            system = await core.read_namespace("kube-system")
        # kube-system and default, created after the initial revision.
        assert namespaces.metadata.resource_version == "5002"
        assert await anyio.to_thread.run_sync(plain.state) == {
            "revision": 5002,
            "compacted": 5000,
            "watches": 0,
        }
        # Each server is a cluster of its own.
        other = await client.CoreV1Api(api).read_namespace("kube-system")
        assert system.metadata.uid != other.metadata.uid
    finally:
        await anyio.to_thread.run_sync(plain.cleanup)
    assert plain.pid is None
    assert not plain.directory.exists()
