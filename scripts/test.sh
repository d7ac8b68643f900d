#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, then runs every test,
# including the ones that start a real etcd and the ones that need root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# A one-off build gains nothing from incremental state; it only takes disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"
