#!/usr/bin/env bash
# Installs, on Debian as root, the system packages clusterlink builds and tests with.
# Installs only what is missing; a no-op on a machine that has everything.
set -euo pipefail

packages=(
  protobuf-compiler libprotobuf-dev   # protoc and google/protobuf/*.proto (etcd-client, our api)
  iproute2 nftables                   # network namespaces, veth, routes, NAT for the lab
  etcd-server                         # the etcd store backend and its contract tests
  wireguard-tools wireguard-go        # interop peers for the gateway
  iperf3 dnsutils iputils-ping        # throughput, DNS (dig) and reachability checks
  knot dnsperf                        # the DNS benchmark's reference server and load generator
  podman runc debootstrap             # the container image: built and run by the tests
  ca-certificates build-essential pkg-config
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}; run as root (or install them) and retry" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The manifests' checks: kubectl (its kustomize) and kubernetes-validate (PyPI; offline
# schemas of every Kubernetes version).
if ! command -v kubectl >/dev/null 2>&1; then
  echo "installing: kubernetes-client (kubectl)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing: kubernetes-validate (pip)" >&2
  python3 -m pip install -q kubernetes-validate
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not on PATH: install the Rust toolchain (rustup, 1.95 or newer)" >&2
  exit 1
fi
