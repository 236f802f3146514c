"""``kdsctl install control-plane`` and kds.install: the manifests, the values, the errors.

The manifests are checked against the Kubernetes API's own schemas (the
kubernetes-validate package), against each other (Services select the pods and name
their ports, mounts name volumes), and against kds itself: the control plane's
environment is loaded with ``kds.config.load_config``, the proxy files are read with
``kds.dp``, and the CRDs are ``kds.k8s``'s.
"""

from __future__ import annotations

import base64
import re
import ssl
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from click.testing import CliRunner, Result
from cryptography import x509

from kds import DEFAULT_CATALOG, k8s
from kds.cli.ctl import main
from kds.config import load_config
from kds.dp import read_proxy_document
from kds.install import (
    VALUE_KEYS,
    InstallError,
    ServerTls,
    dump_manifests,
    generate_dp_server_tls,
    load_values,
    parse_set,
    render_manifests,
)

KUBERNETES_VERSION = "1.30.0"  # a version whose schemas kubernetes-validate ships
DOCS = Path(__file__).parents[2] / "docs" / "kubernetes.md"
ZONE_TOKEN_FILE = "/var/run/secrets/kds/zone-token/token"  # noqa: S105 -- a path

ZONE = (
    "--set",
    "controlPlane.mode=zone",
    "--set",
    "controlPlane.zone=zone-1",
    "--set",
    "controlPlane.kdsGlobalAddress=grpcs://35.226.196.103:5685",
    "--set",
    "controlPlane.tls.kdsZoneClient.skipVerify=true",
)
GLOBAL = ("--set", "controlPlane.mode=global")
PROXIES = ("--set", "ingress.enabled=true", "--set", "egress.enabled=true")

UNIVERSAL_VALUES = """\
controlPlane:
  mode: global
  environment: universal
  secrets:
    postgresDb:
      Secret: your-secret-name
      Key: POSTGRES_DB
      Env: KUMA_STORE_POSTGRES_DB_NAME
    postgresHost:
      Secret: your-secret-name
      Key: POSTGRES_HOST_RW
      Env: KUMA_STORE_POSTGRES_HOST
    postgrestUser:
      Secret: your-secret-name
      Key: POSTGRES_USER
      Env: KUMA_STORE_POSTGRES_USER
    postgresPassword:
      Secret: your-secret-name
      Key: POSTGRES_PASSWORD
      Env: KUMA_STORE_POSTGRES_PASSWORD
postgres:
  port: "5432"
  tls:
    mode: disable
"""

# What the kubelet would put in the secretKeyRef variables of UNIVERSAL_VALUES.
SECRET_VALUES = {
    "KUMA_STORE_POSTGRES_DB_NAME": "kds",
    "KUMA_STORE_POSTGRES_HOST": "db.internal",
    "KUMA_STORE_POSTGRES_USER": "kds",
    "KUMA_STORE_POSTGRES_PASSWORD": "s3cret",
}


def run(*args: str) -> Result:
    result = CliRunner().invoke(main, ["install", "control-plane", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback here is a bug in kdsctl: show it
    return result


def install(*args: str) -> list[dict[str, Any]]:
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("---\n")
    return list(yaml.safe_load_all(result.stdout))


def fails(*args: str) -> str:
    """Run the command expecting one ``Error:`` line, exit status 2 and no output."""
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0].removeprefix("Error: ")


def universal(tmp_path: Path, text: str = UNIVERSAL_VALUES) -> tuple[str, str]:
    path = tmp_path / "values.yaml"
    path.write_text(text, encoding="utf-8")
    return ("--values", str(path))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def names(docs: list[dict[str, Any]], kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in docs if d["kind"] == kind}


def pod(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]], name: str = "kds-control-plane") -> dict[str, Any]:
    (only,) = pod(docs, name)["containers"]
    return dict(only)


def env_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        item["name"]: item.get("value", item.get("valueFrom")) for item in container(docs)["env"]
    }


def environment(spec: dict[str, Any], namespace: str) -> dict[str, str]:
    """A container's environment as the kubelet would give it, Secrets read."""
    environ: dict[str, str] = {}
    for item in spec["env"]:
        if "value" in item:
            assert isinstance(item["value"], str), item
            environ[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            assert item["valueFrom"]["fieldRef"] == {"fieldPath": "metadata.namespace"}
            environ[item["name"]] = namespace
        else:
            environ[item["name"]] = SECRET_VALUES[item["name"]]
    return environ


# -- the manifests are valid Kubernetes objects ------------------------------------------

SCENARIOS = {
    "global": GLOBAL,
    "zone": ZONE,
    "zone-with-proxies": (*ZONE, *PROXIES, "--set", "ingress.advertisedAddress=10.0.0.1"),
    "zone-own-namespace": (*ZONE, *PROXIES, "--namespace", "mesh-cp"),
}


@pytest.mark.parametrize("scenario", sorted([*SCENARIOS, "universal-global"]))
def test_every_document_is_a_valid_kubernetes_object(scenario: str, tmp_path: Path) -> None:
    args = SCENARIOS.get(scenario) or (
        *universal(tmp_path),
        "--set",
        "postgres.tls.mode=verifyCa",
        "--set",
        "postgres.tls.caSecretName=postgres-ca",
        "--set",
        "postgres.tls.secretName=postgres-client",
    )
    docs = install(*args)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert docs[0]["kind"] == "Namespace"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_services_mounts_and_probes_refer_to_what_exists(scenario: str) -> None:
    docs = install(*SCENARIOS[scenario])
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    for deployment in deployments:
        template = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()
        volumes = {volume["name"] for volume in template["spec"]["volumes"]}
        for each in template["spec"]["containers"]:
            assert {mount["name"] for mount in each["volumeMounts"]} <= volumes
    for service in (d for d in docs if d["kind"] == "Service"):
        chosen = [
            d
            for d in deployments
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(chosen) == 1, service["metadata"]["name"]
        ports = {
            p["name"]
            for c in chosen[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    probes = [
        container(docs)[probe] for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    ]
    assert {probe["httpGet"]["path"] for probe in probes} == {"/ready"}
    assert {probe["httpGet"]["port"] for probe in probes} == {"http-api"}


def test_containers_run_unprivileged_on_a_read_only_root(tmp_path: Path) -> None:
    for docs in (install(*ZONE, *PROXIES), install(*universal(tmp_path))):
        for deployment in (d for d in docs if d["kind"] == "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for each in [*spec.get("initContainers", []), *spec["containers"]]:
                assert each["securityContext"] == {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                }
                assert each["resources"]["requests"].keys() == {"cpu", "memory"}
        work = {"name": "work", "mountPath": "/var/lib/kds"}
        assert work in container(docs)["volumeMounts"]
        assert {"name": "work", "emptyDir": {}} in pod(docs, "kds-control-plane")["volumes"]


# -- CRDs and RBAC -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [GLOBAL, ZONE])
def test_crds_are_the_kubernetes_stores(mode: tuple[str, ...]) -> None:
    docs = install(*mode)
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert crds == k8s.crd_manifests(DEFAULT_CATALOG)


def test_rbac_grants_what_the_store_needs_and_nothing_more() -> None:
    docs = install(*ZONE, "--namespace", "mesh-cp")
    cluster_role = find(docs, "ClusterRole", "kds-control-plane-mesh-cp")
    granted = {
        (group, resource, verb, tuple(rule.get("resourceNames", ())))
        for rule in cluster_role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    crds = tuple(k8s.crd_name(t.name) for t in DEFAULT_CATALOG)
    crd = ("apiextensions.k8s.io", "customresourcedefinitions")
    assert granted == {
        (*crd, "list", ()),
        (*crd, "create", ()),
        (*crd, "get", crds),
        ("", "namespaces", "get", ("kube-system", "mesh-cp")),
    }
    role = find(docs, "Role", "kds-control-plane")
    verbs = ["get", "list", "watch", "create", "update", "delete"]
    assert role["metadata"]["namespace"] == "mesh-cp"
    assert role["rules"] == [
        {
            "apiGroups": ["kuma.io"],
            "resources": [k8s.plural(t.name) for t in DEFAULT_CATALOG],
            "verbs": verbs,
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]},
    ]
    subject = [{"kind": "ServiceAccount", "name": "kds-control-plane", "namespace": "mesh-cp"}]
    binding = find(docs, "ClusterRoleBinding", "kds-control-plane-mesh-cp")
    assert binding["subjects"] == subject
    assert binding["roleRef"]["name"] == "kds-control-plane-mesh-cp"
    assert find(docs, "RoleBinding", "kds-control-plane")["subjects"] == subject
    assert pod(docs, "kds-control-plane")["serviceAccountName"] == "kds-control-plane"


# -- what each value changes -------------------------------------------------------------


def test_mode_decides_the_services() -> None:
    docs = install(*GLOBAL)
    assert names(docs, "Service") == {"kds-control-plane", "kds-global-zone-sync"}
    sync = find(docs, "Service", "kds-global-zone-sync")["spec"]
    assert sync["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"]) for p in sync["ports"]] == [(5685, "grpc-kds")]
    assert {"name": "grpc-kds", "containerPort": 5685, "protocol": "TCP"} in container(docs)[
        "ports"
    ]
    api = find(docs, "Service", "kds-control-plane")["spec"]
    assert (api["type"], [p["port"] for p in api["ports"]]) == ("ClusterIP", [5681])
    assert env_of(docs)["KUMA_MODE"] == "global"
    assert names(docs, "Secret") == set()  # a global has no dataplane server

    docs = install(*ZONE)
    assert names(docs, "Service") == {"kds-control-plane"}
    api = find(docs, "Service", "kds-control-plane")["spec"]
    assert [p["port"] for p in api["ports"]] == [5681, 5678]
    assert env_of(docs)["KUMA_MODE"] == "zone"
    assert names(docs, "Deployment") == {"kds-control-plane"}


def test_zone_values_become_the_zone_settings() -> None:
    env = env_of(install(*ZONE))
    assert env["KUMA_MULTIZONE_ZONE_NAME"] == "zone-1"
    assert env["KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS"] == "grpcs://35.226.196.103:5685"
    assert env["KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY"] == "true"
    assert env["KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH"] == ZONE_TOKEN_FILE
    env = env_of(
        install(
            *ZONE,
            "--set",
            "controlPlane.zone=eu-west",
            "--set",
            "controlPlane.kdsGlobalAddress=grpcs://global.example:443",
            "--set",
            "controlPlane.tls.kdsZoneClient.skipVerify=false",
        )
    )
    assert env["KUMA_MULTIZONE_ZONE_NAME"] == "eu-west"
    assert env["KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS"] == "grpcs://global.example:443"
    assert env["KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY"] == "false"


def test_the_zone_token_comes_from_its_secret() -> None:
    docs = install(*ZONE)
    volumes = {v["name"]: v for v in pod(docs, "kds-control-plane")["volumes"]}
    assert volumes["zone-token"]["secret"]["secretName"] == "kds-zone-token"
    assert volumes["zone-token"]["secret"]["items"] == [{"key": "token", "path": "token"}]
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert mounts["zone-token"] == "/var/run/secrets/kds/zone-token"


def test_common_values_reach_the_deployment() -> None:
    docs = install(
        *ZONE,
        *PROXIES,
        "--set",
        "controlPlane.image=registry.example/kds:dev",
        "--set",
        "controlPlane.replicas=3",
        "--set",
        "controlPlane.logLevel=debug",
    )
    assert find(docs, "Deployment", "kds-control-plane")["spec"]["replicas"] == 3
    assert env_of(docs)["KDS_LOG_LEVEL"] == "debug"
    for name in ("kds-control-plane", "kds-ingress", "kds-egress"):
        assert container(docs, name)["image"] == "registry.example/kds:dev"
    assert "--log-level=debug" in container(docs, "kds-ingress")["args"]
    assert container(install(*GLOBAL))["image"].startswith("docker.io/kds/kds:")


@pytest.mark.parametrize("kind", ["ingress", "egress"])
def test_zone_proxies(kind: str) -> None:
    docs = install(*ZONE, "--set", f"{kind}.enabled=true")
    name = f"kds-{kind}"
    other = "egress" if kind == "ingress" else "ingress"
    assert names(docs, "Deployment") == {"kds-control-plane", name}
    assert f"kds-{other}" not in names(docs, "ConfigMap") | names(docs, "Service")
    proxy = container(docs, name)
    assert proxy["command"] == ["kds-dp", "run"]
    assert proxy["args"][:5] == [
        f"--proxy-type={kind}",
        "--cp-address=https://kds-control-plane.kds-system.svc:5678",
        "--dataplane-token-file=/var/run/secrets/kds/proxy-token/token",
        "--dataplane-file=/etc/kds/proxy/dataplane.yaml",
        "--ca-cert-file=/var/run/secrets/kds/dp-server-ca/ca.crt",
    ]
    volumes = {v["name"]: v for v in pod(docs, name)["volumes"]}
    assert volumes["proxy-token"]["secret"]["secretName"] == f"kds-{kind}-token"
    # The proxy gets the CA, never the dataplane server's private key.
    assert volumes["dp-server-ca"]["secret"] == {
        "secretName": "kds-dp-server-tls",
        "defaultMode": 0o440,
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert pod(docs, name)["automountServiceAccountToken"] is False
    assert find(docs, "Deployment", name)["spec"]["strategy"] == {"type": "Recreate"}
    # The proxy file is one kds-dp accepts as it is.
    document = yaml.safe_load(find(docs, "ConfigMap", name)["data"]["dataplane.yaml"])
    key, _, spec = read_proxy_document(document, kind)
    port = 10001 if kind == "ingress" else 10002
    assert key.name == name
    assert spec["networking"] == {"address": f"{name}.kds-system.svc", "port": port}
    service = find(docs, "Service", name)["spec"]
    assert service["type"] == ("LoadBalancer" if kind == "ingress" else "ClusterIP")
    assert [p["port"] for p in service["ports"]] == [port]


def test_ingress_advertises_the_address_other_zones_use() -> None:
    docs = install(
        *ZONE,
        "--set",
        "ingress.enabled=true,ingress.advertisedAddress=35.1.2.3,ingress.advertisedPort=30001",
    )
    document = yaml.safe_load(find(docs, "ConfigMap", "kds-ingress")["data"]["dataplane.yaml"])
    _, _, spec = read_proxy_document(document, "ingress")
    assert spec["networking"]["advertisedAddress"] == "35.1.2.3"
    assert spec["networking"]["advertisedPort"] == 30001


def test_generated_dataplane_server_certificate_names_the_service() -> None:
    docs = install(*ZONE, *PROXIES, "--namespace", "mesh-cp")
    secret = find(docs, "Secret", "kds-dp-server-tls")
    assert secret["type"] == "kubernetes.io/tls"
    data = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    assert data["ca.crt"] == data["tls.crt"]
    certificate = x509.load_pem_x509_certificate(data["tls.crt"])
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kds-control-plane.mesh-cp.svc" in sans.get_values_for_type(x509.DNSName)
    env = env_of(docs)
    assert env["KUMA_DP_SERVER_TLS_CERT_FILE"] == "/var/run/secrets/kds/dp-server-tls/tls.crt"
    assert env["KUMA_DP_SERVER_TLS_KEY_FILE"] == "/var/run/secrets/kds/dp-server-tls/tls.key"
    # A new certificate rolls the control plane and the proxies together.
    checksums = {
        find(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"][
            "kds.kuma.io/dp-server-tls-sha256"
        ]
        for name in ("kds-control-plane", "kds-ingress", "kds-egress")
    }
    assert len(checksums) == 1


def handshake(tls: ServerTls, server_name: str, tmp_path: Path) -> None:
    """A TLS handshake with a server presenting *tls*, trusting its ``ca.crt`` as kds-dp does."""
    (tmp_path / "tls.crt").write_bytes(tls.certificate)
    (tmp_path / "tls.key").write_bytes(tls.key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_context = ssl.create_default_context()
    client_context.load_verify_locations(cadata=tls.certificate.decode("ascii"))
    channels = [ssl.MemoryBIO() for _ in range(4)]
    server = server_context.wrap_bio(channels[0], channels[1], server_side=True)
    client = client_context.wrap_bio(channels[2], channels[3], server_hostname=server_name)
    done = {"server": False, "client": False}
    for _ in range(10):
        for side, peer in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    peer.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        channels[0].write(channels[3].read())  # client -> server
        channels[2].write(channels[1].read())  # server -> client
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_proxies_verify_the_generated_certificate_by_the_service_name(tmp_path: Path) -> None:
    tls = generate_dp_server_tls("mesh-cp")
    handshake(tls, "kds-control-plane.mesh-cp.svc", tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls, "kds-control-plane.kds-system.svc", tmp_path)


def test_own_dataplane_server_secret() -> None:
    docs = install(
        *ZONE,
        "--set",
        "ingress.enabled=true",
        "--set",
        "controlPlane.tls.dpServer.secret=zone-cp-tls",
        "--set",
        "controlPlane.tls.dpServer.caKey=tls.crt",
    )
    assert names(docs, "Secret") == set()
    volumes = {v["name"]: v for v in pod(docs, "kds-control-plane")["volumes"]}
    assert volumes["dp-server-tls"]["secret"]["secretName"] == "zone-cp-tls"
    ca = {v["name"]: v for v in pod(docs, "kds-ingress")["volumes"]}["dp-server-ca"]
    assert ca["secret"]["secretName"] == "zone-cp-tls"
    assert ca["secret"]["items"] == [{"key": "tls.crt", "path": "ca.crt"}]
    template = find(docs, "Deployment", "kds-control-plane")["spec"]["template"]
    assert "annotations" not in template["metadata"]


def test_universal_global_reads_postgres_from_secrets(tmp_path: Path) -> None:
    docs = install(*universal(tmp_path), "--set", "postgres.port=6543")
    env = env_of(docs)
    assert env["KUMA_ENVIRONMENT"] == "universal"
    assert env["KUMA_STORE_TYPE"] == "postgres"
    assert env["KUMA_STORE_POSTGRES_PORT"] == "6543"
    assert env["KUMA_STORE_POSTGRES_TLS_MODE"] == "disable"
    assert env["KUMA_STORE_POSTGRES_HOST"] == {
        "secretKeyRef": {"name": "your-secret-name", "key": "POSTGRES_HOST_RW"}
    }
    assert env["KUMA_STORE_POSTGRES_PASSWORD"] == {
        "secretKeyRef": {"name": "your-secret-name", "key": "POSTGRES_PASSWORD"}
    }
    assert "KDS_STORE_KUBERNETES_NAMESPACE" not in env
    # No Kubernetes store: no CRDs, no RBAC, no API credentials in the pod.
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Namespace", "ServiceAccount", "Deployment", "Service"}
    assert pod(docs, "kds-control-plane")["automountServiceAccountToken"] is False
    (migrate,) = pod(docs, "kds-control-plane")["initContainers"]
    assert migrate["command"] == ["kds-cp", "migrate", "up"]
    assert migrate["env"] == container(docs)["env"]


def test_universal_postgres_tls(tmp_path: Path) -> None:
    docs = install(
        *universal(tmp_path),
        "--set",
        "postgres.tls.mode=verifyCa,postgres.tls.caSecretName=pg-ca,postgres.tls.secretName=pg-client",
    )
    env = env_of(docs)
    assert env["KUMA_STORE_POSTGRES_TLS_MODE"] == "verifyCa"
    assert env["KUMA_STORE_POSTGRES_TLS_CA_PATH"] == "/var/run/secrets/kds/postgres-ca/ca.crt"
    assert env["KUMA_STORE_POSTGRES_TLS_CERT_PATH"] == "/var/run/secrets/kds/postgres-tls/tls.crt"
    volumes = {
        v["name"]: v["secret"]["secretName"]
        for v in pod(docs, "kds-control-plane")["volumes"]
        if "secret" in v
    }
    assert volumes == {"postgres-ca": "pg-ca", "postgres-tls": "pg-client"}


def test_secrets_by_set(tmp_path: Path) -> None:
    docs = install(
        *GLOBAL,
        "--set",
        "controlPlane.environment=universal",
        "--set",
        "controlPlane.secrets.host.Secret=pg,controlPlane.secrets.host.Key=host,"
        "controlPlane.secrets.host.Env=KDS_STORE_POSTGRES_HOST",
    )
    assert env_of(docs)["KDS_STORE_POSTGRES_HOST"] == {
        "secretKeyRef": {"name": "pg", "key": "host"}
    }


def test_namespace_changes_every_reference() -> None:
    docs = install(*ZONE, *PROXIES, "--namespace", "mesh-cp")
    for doc in docs:
        if doc["kind"] in (
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ):
            assert "namespace" not in doc["metadata"]
        else:
            assert doc["metadata"]["namespace"] == "mesh-cp", doc["kind"]
    assert docs[0]["metadata"]["name"] == "mesh-cp"
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        for binding in (d for d in docs if d["kind"] == kind):
            assert {s["namespace"] for s in binding["subjects"]} == {"mesh-cp"}
    assert (
        "--cp-address=https://kds-control-plane.mesh-cp.svc:5678"
        in container(docs, "kds-egress")["args"]
    )
    text = dump_manifests(docs)
    assert "kds-system" not in text  # no reference left behind
    assert "kds-system" in dump_manifests(install(*ZONE, *PROXIES))


# -- the control plane's environment is one kds-cp accepts --------------------------------


@pytest.mark.parametrize("namespace", ["kds-system", "mesh-cp"])
def test_zone_environment_loads(namespace: str) -> None:
    docs = install(*ZONE, "--namespace", namespace)
    config = load_config(environment(container(docs), namespace))
    assert config.mode == "zone"
    assert config.environment == "kubernetes"
    assert config.store.type == "kubernetes"
    assert config.store.kubernetes.namespace == namespace
    assert config.store.kubernetes.group == k8s.DEFAULT_GROUP
    assert config.multizone.zone.name == "zone-1"
    assert config.multizone.zone.global_address == "grpcs://35.226.196.103:5685"
    assert config.multizone.zone.kds.tls_skip_verify is True
    assert config.multizone.zone.kds.cp_token_path == ZONE_TOKEN_FILE
    assert (config.api.address, config.api.port) == ("0.0.0.0", 5681)  # noqa: S104
    assert config.dp_server.port == 5678
    assert config.dp_server.tls_cert_file == "/var/run/secrets/kds/dp-server-tls/tls.crt"
    assert config.general.work_dir == "/var/lib/kds"
    assert config.log.level == "info"


def test_global_environment_loads() -> None:
    docs = install(*GLOBAL, "--set", "controlPlane.logLevel=warning")
    config = load_config(environment(container(docs), "kds-system"))
    assert (config.mode, config.store.type) == ("global", "kubernetes")
    assert config.store.kubernetes.namespace == "kds-system"
    assert config.multizone.global_.kds.grpc_port == 5685
    assert config.log.level == "warning"


def test_universal_environment_loads(tmp_path: Path) -> None:
    docs = install(
        *universal(tmp_path),
        "--set",
        "postgres.port=6543,postgres.tls.mode=verifyCa,postgres.tls.caSecretName=pg-ca",
    )
    config = load_config(environment(container(docs), "kds-system"))
    assert (config.mode, config.environment, config.store.type) == (
        "global",
        "universal",
        "postgres",
    )
    postgres = config.store.postgres
    assert (postgres.host, postgres.port, postgres.user, postgres.db_name) == (
        "db.internal",
        6543,
        "kds",
        "kds",
    )
    assert postgres.password == "s3cret"  # noqa: S105 -- SECRET_VALUES' password
    assert postgres.tls.mode == "verifyCa"
    assert postgres.tls.ca_path == "/var/run/secrets/kds/postgres-ca/ca.crt"


# -- reading the values ------------------------------------------------------------------


def test_set_wins_over_values_files(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text("controlPlane:\n  zone: zone-a\n  replicas: 2\n", encoding="utf-8")
    second = tmp_path / "second.yaml"
    second.write_text("controlPlane:\n  zone: zone-b\n", encoding="utf-8")
    docs = install(
        *ZONE[4:],  # the address and skipVerify only
        "--values",
        str(first),
        "--values",
        str(second),
    )
    assert env_of(docs)["KUMA_MULTIZONE_ZONE_NAME"] == "zone-b"
    assert find(docs, "Deployment", "kds-control-plane")["spec"]["replicas"] == 2
    docs = install(*ZONE[4:], "--values", str(first), "--set", "controlPlane.zone=zone-c")
    assert env_of(docs)["KUMA_MULTIZONE_ZONE_NAME"] == "zone-c"


def test_numbers_stay_strings_where_strings_are_wanted(tmp_path: Path) -> None:
    docs = install(*ZONE, "--set", "controlPlane.zone=123")
    assert env_of(docs)["KUMA_MULTIZONE_ZONE_NAME"] == "123"
    docs = install(*universal(tmp_path, UNIVERSAL_VALUES.replace('port: "5432"', "port: 5433")))
    assert env_of(docs)["KUMA_STORE_POSTGRES_PORT"] == "5433"
    assert load_values(sets=[*ZONE[1::2], "controlPlane.replicas=4"]).replicas == 4


def test_parse_set_reads_helm_syntax() -> None:
    assert parse_set("a.b=1,c=x=y") == [(("a", "b"), "1"), (("c",), "x=y")]
    assert parse_set(r"a\.b=one\,two") == [(("a.b",), "one,two")]
    assert parse_set("a=") == [(("a",), "")]


def test_rendering_is_deterministic_given_the_certificate() -> None:
    values = load_values(sets=[*ZONE[1::2], "ingress.enabled=true"])
    tls = generate_dp_server_tls("kds-system")
    assert render_manifests(values, dp_server_tls=tls) == render_manifests(
        values, dp_server_tls=tls
    )


def test_every_key_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for value_key in VALUE_KEYS:
        assert f"`{value_key.key}`" in text, value_key.key


# -- bad input ---------------------------------------------------------------------------

BAD = [
    (("--set", "controlPlane.mode=glob"), "controlPlane.mode: must be global or zone, got 'glob'"),
    ((), "controlPlane.zone: is required with controlPlane.mode=zone"),
    (
        ("--set", "controlPlane.zone=zone-1"),
        "controlPlane.kdsGlobalAddress: is required with controlPlane.mode=zone",
    ),
    ((*GLOBAL, "--set", "controlPlane.zone=zone-1"), "controlPlane.zone: is for zones only"),
    (
        (*GLOBAL, "--set", "controlPlane.kdsGlobalAddress=grpcs://g:5685"),
        "controlPlane.kdsGlobalAddress: is for zones only",
    ),
    ((*GLOBAL, "--set", "ingress.enabled=true"), "ingress.enabled: is for zones only"),
    ((*GLOBAL, "--set", "egress.enabled=true"), "egress.enabled: is for zones only"),
    (
        (*ZONE, "--set", "controlPlane.kdsGlobalAddress=https://g:5685"),
        "controlPlane.kdsGlobalAddress: must be grpcs://HOST:PORT",
    ),
    (
        (*ZONE, "--set", "controlPlane.kdsGlobalAddress=grpcs://g:port"),
        "controlPlane.kdsGlobalAddress: must be grpcs://HOST:PORT",
    ),
    (
        (*ZONE, "--set", "controlPlane.kdsGlobalAddress=grpc://g:5685"),
        "controlPlane.tls.kdsZoneClient.skipVerify: needs a grpcs:// address",
    ),
    ((*ZONE, "--set", "controlPlane.zone=Zone_1"), "controlPlane.zone: must be a DNS-1123 label"),
    ((*ZONE, "--set", "controlPlane.zone=" + "z" * 64), "controlPlane.zone: must be a DNS-1123"),
    (
        (*ZONE, "--set", "controlPlane.environment=openshift"),
        "controlPlane.environment: must be kubernetes or universal, got 'openshift'",
    ),
    (
        (*ZONE, "--set", "controlPlane.environment=universal"),
        "controlPlane.environment: universal is for a global only",
    ),
    (
        (*GLOBAL, "--set", "controlPlane.environment=universal"),
        "controlPlane.secrets: a universal global needs the PostgreSQL host",
    ),
    (
        (*GLOBAL, "--set", "controlPlane.mdoe=zone"),
        "controlPlane.mdoe: unknown key (did you mean controlPlane.mode?)",
    ),
    (
        (*GLOBAL, "--set", "controlplane.mode=zone"),
        "controlplane: unknown key (did you mean controlPlane?)",
    ),
    ((*GLOBAL, "--set", "controlPlane=global"), "controlPlane: must be a mapping of keys, got str"),
    ((*ZONE, "--set", "egress.enabled=yes"), "egress.enabled: must be true or false, got 'yes'"),
    (
        (*GLOBAL, "--set", "controlPlane.replicas=two"),
        "controlPlane.replicas: must be a whole number",
    ),
    ((*GLOBAL, "--set", "controlPlane.replicas=0"), "controlPlane.replicas: must be at least 1"),
    (
        (*GLOBAL, "--set", "controlPlane.logLevel=trace"),
        "controlPlane.logLevel: must be debug, info,",
    ),
    (
        (*GLOBAL, "--set", "controlPlane.image=a b"),
        "controlPlane.image: must be an image reference",
    ),
    ((*GLOBAL, "--set", "postgres.port=5433"), "postgres.port: is for a PostgreSQL store only"),
    (
        (*ZONE, "--set", "ingress.advertisedAddress=1.2.3.4"),
        "ingress.advertisedAddress: needs ingress.enabled=true",
    ),
    (
        (*ZONE, "--set", "ingress.enabled=true,ingress.advertisedPort=70000"),
        "ingress.advertisedPort: must be a port between 1 and 65535",
    ),
    (
        (*ZONE, "--set", "controlPlane.tls.dpServer.secret=Bad_Name"),
        "controlPlane.tls.dpServer.secret: must be a Secret's name",
    ),
    ((*GLOBAL, "--set", "controlPlane.mode"), "--set: expected KEY=VALUE, got 'controlPlane.mode'"),
    ((*GLOBAL, "--set", "controlPlane..mode=zone"), "--set: expected KEY=VALUE"),
    ((*GLOBAL, "--namespace", "Bad_NS"), "--namespace: must be a DNS-1123 label"),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[message for _, message in BAD])
def test_bad_values_are_one_error_line(args: tuple[str, ...], expected: str) -> None:
    assert fails(*args).startswith(expected)


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (
            ("KUMA_STORE_POSTGRES_HOST\n", "KUMA_STORE_POSTGRES_HOSTS\n"),
            "controlPlane.secrets.postgresHost.Env: kds-cp reads no environment variable "
            "KUMA_STORE_POSTGRES_HOSTS (did you mean KUMA_STORE_POSTGRES_HOST?)",
        ),
        (
            ("Env: KUMA_STORE_POSTGRES_USER", "Env: KUMA_MODE"),
            "controlPlane.secrets.postgrestUser.Env: KUMA_MODE sets mode, which the install "
            "sets already (KUMA_MODE)",
        ),
        (
            ("Env: KUMA_STORE_POSTGRES_USER", "Env: KDS_STORE_POSTGRES_HOST"),
            "controlPlane.secrets.postgrestUser.Env: KDS_STORE_POSTGRES_HOST sets "
            "store.postgres.host, as controlPlane.secrets.postgresHost does",
        ),
        (
            ("Key: POSTGRES_DB", "Kee: POSTGRES_DB"),
            "controlPlane.secrets.postgresDb.Kee: unknown key (expected Secret, Key and Env)",
        ),
        (
            ("Secret: your-secret-name\n      Key: POSTGRES_DB", "Key: POSTGRES_DB"),
            "controlPlane.secrets.postgresDb.Secret: must be a non-empty string, got nothing",
        ),
        (
            ("mode: disable", "mode: verifyCa"),
            "postgres.tls.caSecretName: is required with postgres.tls.mode=verifyCa",
        ),
        (
            ("mode: disable", "mode: verifyFull\n    disableSSLSNI: true"),
            "postgres.tls.disableSSLSNI: cannot be combined with postgres.tls.mode=verifyFull",
        ),
        (('port: "5432"', 'port: "54x"'), "postgres.port: must be a port between 1 and 65535"),
        (('port: "5432"', "port: true"), "postgres.port: must be a string, got bool"),
    ],
)
def test_bad_universal_values(replace: tuple[str, str], expected: str, tmp_path: Path) -> None:
    text = UNIVERSAL_VALUES.replace(*replace)
    assert text != UNIVERSAL_VALUES
    assert fails(*universal(tmp_path, text)).startswith(expected)


def test_bad_values_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert (
        fails("--values", str(missing))
        == f"--values {missing}: cannot be read: No such file or directory"
    )
    path = tmp_path / "values.yaml"
    path.write_text("controlPlane:\n  mode: global\n  mode: zone\n", encoding="utf-8")
    assert fails("--values", str(path)).startswith(f"--values {path}: invalid YAML at line 3")
    path.write_text("- controlPlane\n", encoding="utf-8")
    assert fails("--values", str(path)) == f"--values {path}: must be a mapping of keys, got list"
    path.write_text("ingress:\n  enabled: yes\n", encoding="utf-8")  # YAML 1.2: a string
    assert (
        fails(*ZONE, "--values", str(path)) == "ingress.enabled: must be true or false, got 'yes'"
    )


def test_errors_name_their_key() -> None:
    with pytest.raises(InstallError) as caught:
        load_values([{"controlPlane": {"mode": "zone", "zone": "zone-1"}}])
    assert caught.value.key == "controlPlane.kdsGlobalAddress"
    with pytest.raises(InstallError, match=r"^--namespace: "):
        render_manifests(load_values(sets=["controlPlane.mode=global"]), namespace="-x")
    assert re.fullmatch(
        r"docker\.io/kds/kds:\S+", load_values(sets=["controlPlane.mode=global"]).image
    )
