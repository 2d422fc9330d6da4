#!/usr/bin/env bash
# Starts one Meshwork node on embedded defaults (`meshd --dev`: generated secret, data under
# ~/.cache/meshwork/dev, loopback only) and gives it a demo workload entry, then keeps the
# node in the foreground until Ctrl-C.
#
# Until the workload runtimes land (containers, functions, batch), the "workload" is a desired
# state entry written through the gRPC API: it shows the path every workload will take.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked -p meshwork-node -p meshwork-client
bin=target/debug
export MESH_ENDPOINT=http://127.0.0.1:7100

"$bin/meshd" --dev --name demo --label role=demo &
node=$!
trap 'kill $node 2>/dev/null; wait $node 2>/dev/null' EXIT INT TERM

for _ in $(seq 1 100); do
  "$bin/meshctl" nodes >/dev/null 2>&1 && break
  kill -0 $node 2>/dev/null || { echo "meshd exited; see the log above" >&2; exit 1; }
  sleep 0.1
done

"$bin/meshctl" state put demo/workloads/hello '{"kind":"demo","message":"hello from meshwork"}'
echo
"$bin/meshctl" nodes
echo
"$bin/meshctl" state ls demo/
echo
echo "The node runs until Ctrl-C. Try: $bin/meshctl nodes --json ; curl -s http://127.0.0.1:8080/metrics"
wait $node
