#!/usr/bin/env bash
# Quickstart: a global and two zone control planes on this machine, replicating.
#
# Starts `kds-cp run` three times (SQLite stores in a temporary directory, zones dialling
# the global over gRPC with TLS and skip-verify, as the multi-zone guide's universal
# steps do, each with a zone token the global issued), applies a Mesh and a MeshTimeout on the global with kdsctl, registers a
# Dataplane in each zone, and prints `kdsctl inspect zones` once both zones are Online.
# Everything it started is stopped when it exits.
#
# Run (after the README's install, in its virtualenv):  bash examples/quickstart.sh
# Ports: QUICKSTART_PORT_BASE (default 5681) + 0 global API, + 4 global KDS,
# + 10000 zone-1 API, + 9997 its dataplane server, + 20000 zone-2 API, + 19997 its
# dataplane server. QUICKSTART_KEEP=1 keeps the work directory.
# (These are not KDS_* names because kds-cp refuses KDS_* variables it does not know.)
set -euo pipefail

base=${QUICKSTART_PORT_BASE:-5681}
global_api=$base
global_kds=$((base + 4))
work=$(mktemp -d "${TMPDIR:-/tmp}/kds-quickstart.XXXXXX")
export KDSCTL_CONFIG="$work/kdsctl.yaml"
pids=()

cleanup() {
    local status=$?
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    if [[ -n "${QUICKSTART_KEEP:-}" ]]; then
        echo "work directory kept: $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wait up to 60 s for a command to succeed (processes start, zones connect).
eventually() {
    local deadline=$((SECONDS + 60))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "gave up waiting for: $*" >&2
            for log in "$work"/*.log; do
                echo "--- $log" >&2
                tail -n 20 "$log" >&2
            done
            return 1
        fi
        sleep 0.2
    done
}

echo "==> global control plane (API :$global_api, KDS grpcs://127.0.0.1:$global_kds)"
KUMA_MODE=global \
KUMA_ENVIRONMENT=universal \
KUMA_GENERAL_WORK_DIR="$work/global" \
KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT=$global_kds \
KDS_MULTIZONE_GLOBAL_KDS_ADDRESS=127.0.0.1 \
KDS_API_PORT=$global_api \
    kds-cp run >"$work/global.log" 2>&1 &
pids+=($!)

eventually kdsctl config control-planes add --name global --address "http://127.0.0.1:$global_api"

for zone in 1 2; do
    echo "==> zone-$zone control plane (API :$((global_api + zone * 10000)))"
    # The global admits a zone only with a cp-scoped zone token that it issued.
    kdsctl generate zone-token --zone zone-$zone --scope cp >"$work/zone-$zone.token"
    KUMA_MODE=zone \
    KUMA_ENVIRONMENT=universal \
    KUMA_MULTIZONE_ZONE_NAME=zone-$zone \
    KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS=grpcs://127.0.0.1:$global_kds \
    KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY=true \
    KUMA_GENERAL_WORK_DIR="$work/zone-$zone" \
    KDS_MULTIZONE_ZONE_KDS_CP_TOKEN_PATH="$work/zone-$zone.token" \
    KDS_API_PORT=$((global_api + zone * 10000)) \
    KDS_DP_SERVER_ADDRESS=127.0.0.1 \
    KDS_DP_SERVER_PORT=$((global_api + zone * 10000 - 3)) \
        kds-cp run >"$work/zone-$zone.log" 2>&1 &
    pids+=($!)
done

for zone in 1 2; do
    eventually kdsctl config control-planes add --name zone-$zone \
        --address "http://127.0.0.1:$((global_api + zone * 10000))"
done
kdsctl config control-planes switch --name global >/dev/null

echo "==> apply a Mesh and a MeshTimeout on the global"
kdsctl apply -f - <<'YAML'
type: Mesh
name: default
---
type: MeshTimeout
mesh: default
name: timeout-global
spec:
  targetRef:
    kind: Mesh
  to:
    - targetRef:
        kind: Mesh
      default:
        connectionTimeout: 2s
YAML

echo "==> register a Dataplane in each zone"
for zone in 1 2; do
    kdsctl config control-planes switch --name zone-$zone >/dev/null
    eventually kdsctl get meshes default  # the Mesh has arrived from the global
    kdsctl apply -f - <<YAML
type: Dataplane
mesh: default
name: backend-$zone
networking:
  address: 127.0.0.$zone
  inbound:
    - port: 8080
      tags:
        kuma.io/service: backend
YAML
done
kdsctl config control-planes switch --name global >/dev/null

both_online() { [[ $(kdsctl inspect zones | grep -c ' Online ') == 2 ]]; }
both_dataplanes() { [[ $(kdsctl get dataplanes -o json | grep -c '"kuma.io/zone"') == 2 ]]; }
eventually both_online
eventually both_dataplanes

echo
echo "$ kdsctl inspect zones"
kdsctl inspect zones
echo
echo "$ kdsctl get dataplanes        # on the global: one from each zone, hash-suffixed"
kdsctl get dataplanes
echo
kdsctl config control-planes switch --name zone-2 >/dev/null
echo "$ kdsctl get meshtimeouts      # in zone-2: the global's policy"
kdsctl get meshtimeouts
