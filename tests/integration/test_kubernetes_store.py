"""The Kubernetes store beyond the conformance suite: the API server's own behaviour.

Everything goes through the real kubernetes_asyncio client, over HTTPS with a bearer
token, against the session's API-server stand-in (``kube_api_server``).
"""

from __future__ import annotations

import contextlib
import json
import ssl

import anyio
import httpx
import pytest
import yaml

from kds.config import create_store, load_config
from kds.daemon import ControlPlane
from kds.errors import CompactedError, ConfigError, StoreUnavailableError
from kds.k8s import crd_manifest
from kds.resource import ResourceKey
from kds.store import Atomicity, Upsert
from kds.testing.checks import read_all
from kds_stores.kubernetes import KubernetesStore
from tests.conftest import new_kube_namespace

pytestmark = pytest.mark.anyio

MESH = ResourceKey("Mesh", None, "default")


def _store(server, **kwargs) -> KubernetesStore:
    kwargs.setdefault("namespace", new_kube_namespace())
    return KubernetesStore(kubeconfig=str(server.kubeconfig), watch_timeout=5.0, **kwargs)


def _api(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.token}"},
        verify=ssl.create_default_context(cafile=str(server.ca_file)),
        timeout=10,
    )


async def test_the_store_declares_it_has_no_transactions():
    assert KubernetesStore.atomicity is Atomicity.ORDERED_PREFIX


async def test_resources_are_custom_resources_kubectl_can_read(kube_api_server):
    namespace = new_kube_namespace()
    async with _store(kube_api_server, namespace=namespace) as store, _api(kube_api_server) as api:
        await store.commit([Upsert(key=MESH, labels={"kuma.io/origin": "global"}, spec={"a": 1})])
        timeout = ResourceKey("MeshTimeout", "default", "Timeout_1")
        await store.commit([Upsert(key=timeout, spec={"x": 2})])
        meshes = (await api.get(f"/apis/kuma.io/v1alpha1/namespaces/{namespace}/meshes")).json()
        [mesh] = meshes["items"]
        assert mesh["metadata"]["name"] == "default"
        assert mesh["metadata"]["labels"] == {"kuma.io/origin": "global"}
        assert mesh["spec"] == {"a": 1}
        path = f"/apis/kuma.io/v1alpha1/namespaces/{namespace}/meshtimeouts"
        [policy] = (await api.get(path)).json()["items"]
        assert policy["mesh"] == "default"
        assert policy["metadata"]["annotations"]["kds.kuma.io/name"] == "Timeout_1"


async def test_an_object_applied_with_kubectl_is_read_and_followed(kube_api_server):
    namespace = new_kube_namespace()
    async with _store(kube_api_server, namespace=namespace) as store, _api(kube_api_server) as api:
        head = await store.head()
        body = {
            "apiVersion": "kuma.io/v1alpha1",
            "kind": "Mesh",
            "metadata": {"name": "applied", "labels": {"team": "a"}},
            "spec": {"mtls": {"enabledBackend": "ca-1"}},
        }
        created = await api.post(f"/apis/kuma.io/v1alpha1/namespaces/{namespace}/meshes", json=body)
        assert created.status_code == 201, created.text
        resource = await store.get(ResourceKey("Mesh", None, "applied"))
        assert (resource.labels, resource.spec, resource.version) == (
            {"team": "a"},
            {"mtls": {"enabledBackend": "ca-1"}},
            1,
        )
        [event] = await read_all(store, head)
        assert event.revision == int(created.json()["metadata"]["resourceVersion"])
        # kds writes it back with its own annotations, as the next version.
        await store.commit([Upsert(key=resource.key, labels={"team": "b"}, expected_version=1)])
        assert (await store.get(resource.key)).version == 2


async def test_a_follower_loses_nothing_when_the_api_server_ends_every_watch(kube_api_server):
    async with _store(kube_api_server) as store:
        received = []

        async def follow() -> None:
            async with contextlib.aclosing(store.follow(0)) as events:
                # follow() never ends: each event must land in the list as it comes.
                async for event in events:
                    received.append(event.key.name)  # noqa: PERF401

        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            for n in range(10):
                await store.commit([Upsert(key=ResourceKey("Mesh", None, f"m{n}"))])
                if n % 3 == 0:
                    assert kube_api_server.close_watches() >= 1
            with anyio.fail_after(30):
                while len(received) < 10:  # noqa: ASYNC110 -- the follower's list, polled
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()
        assert received == [f"m{n}" for n in range(10)]


async def test_history_the_api_server_compacted_is_a_compacted_error(kube_api_server):
    namespace = new_kube_namespace()
    async with _store(kube_api_server, namespace=namespace) as store:
        first = await store.commit([Upsert(key=MESH)])
    compacted = kube_api_server.compact()
    async with _store(kube_api_server, namespace=namespace) as store:
        await store.commit([Upsert(key=MESH, spec={"n": 2})])
        with pytest.raises(CompactedError):
            await store.read(0)
        with pytest.raises(CompactedError):
            await store.read(first - 1)
        # After the compaction point the log is whole.
        events = await store.read(compacted)
        assert [event.key for event in events] == [MESH]


async def test_a_wrong_token_is_an_unavailable_store_naming_the_credentials(
    kube_api_server, tmp_path
):
    config = yaml.safe_load(kube_api_server.kubeconfig.read_text())
    config["users"][0]["user"]["token"] = "not-the-token"  # noqa: S105 -- a wrong one
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    store = KubernetesStore(kubeconfig=str(path), namespace=new_kube_namespace())
    with pytest.raises(StoreUnavailableError, match=r"refused the credentials.*401"):
        await store.open()


async def test_a_missing_kubeconfig_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"cannot load the Kubernetes configuration .*nowhere"):
        await KubernetesStore(kubeconfig=str(path)).open()


async def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="namespace 'Bad_NS' is not a DNS label"):
        KubernetesStore(namespace="Bad_NS")
    with pytest.raises(ConfigError, match="watch_timeout"):
        KubernetesStore(watch_timeout=0)


async def test_a_crd_that_does_not_serve_the_version_is_a_config_error(kube_api_server):
    group = "conflict.example.io"
    async with _api(kube_api_server) as api:
        manifest = crd_manifest(KubernetesStore().catalog["Mesh"], group=group, version="v2")
        created = await api.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=manifest
        )
        assert created.status_code == 201, created.text
    store = _store(kube_api_server, group=group)
    with pytest.raises(ConfigError, match=r"meshes\.conflict\.example\.io .*v1alpha1"):
        await store.open()


async def test_kds_cp_runs_a_global_and_a_zone_on_kubernetes(kube_api_server, tmp_path):
    kubeconfig = str(kube_api_server.kubeconfig)
    common = {
        "KUMA_ENVIRONMENT": "kubernetes",
        "KDS_STORE_KUBERNETES_KUBECONFIG": kubeconfig,
        "KDS_STORE_KUBERNETES_WATCH_TIMEOUT": "5",
        "KDS_API_PORT": "0",
        "KDS_SYNC_RECONNECT_BASE": "0.05",
        "KDS_SYNC_RECONNECT_MAX": "0.5",
    }
    global_config = load_config(
        {
            **common,
            "KDS_STORE_KUBERNETES_NAMESPACE": new_kube_namespace(),
            "KDS_GENERAL_WORK_DIR": str(tmp_path / "global"),
            "KDS_MULTIZONE_GLOBAL_KDS_ADDRESS": "127.0.0.1",
            "KDS_MULTIZONE_GLOBAL_KDS_GRPC_PORT": "0",
        }
    )
    assert isinstance(create_store(global_config), KubernetesStore)
    zone_namespace = new_kube_namespace()
    async with anyio.create_task_group() as group, httpx.AsyncClient(timeout=10) as client:
        global_endpoints = await group.start(ControlPlane(global_config).run)
        issued = await client.post(
            global_endpoints.api + "/tokens/zone", json={"zone": "zone-1", "scope": ["cp"]}
        )
        assert issued.status_code == 200, issued.text
        zone_config = load_config(
            {
                **common,
                "KUMA_MODE": "zone",
                "KDS_STORE_KUBERNETES_NAMESPACE": zone_namespace,
                "KDS_GENERAL_WORK_DIR": str(tmp_path / "zone"),
                "KUMA_MULTIZONE_ZONE_NAME": "zone-1",
                "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS": global_endpoints.kds,
                "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY": "true",
                "KDS_MULTIZONE_ZONE_KDS_CP_TOKEN": issued.text,
                "KDS_DP_SERVER_ADDRESS": "127.0.0.1",
                "KDS_DP_SERVER_PORT": "0",
            }
        )
        await group.start(ControlPlane(zone_config).run)
        response = await client.put(
            global_endpoints.api + "/meshes/default", json={"type": "Mesh", "name": "default"}
        )
        assert response.status_code == 201, response.text
        async with _api(kube_api_server) as api:
            path = f"/apis/kuma.io/v1alpha1/namespaces/{zone_namespace}/meshes/default"
            with anyio.fail_after(60):
                # Polling the API server as kubectl would: it has no change signal.
                while (copied := await api.get(path)).status_code != 200:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        labels = json.loads(copied.json()["metadata"]["annotations"]["kds.kuma.io/labels"])
        assert labels["kuma.io/origin"] == "global"
        overview = (await client.get(global_endpoints.api + "/zones/zone-1/_overview")).json()
        assert overview["zoneInsight"]["subscriptions"][-1]["backend"] == "kubernetes"
        group.cancel_scope.cancel()
