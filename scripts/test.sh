#!/usr/bin/env bash
# The whole test suite: unit and property tests, whole-node tests with real meshd processes,
# meshctl end to end, and the chaos scenarios (these need root for network namespaces and
# say "skipped" without it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --locked --bins
cargo test --workspace --locked "$@"
