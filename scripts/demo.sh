#!/usr/bin/env bash
# Starts one Meshwork node on embedded defaults (`meshd --dev`: generated secret, data under
# ~/.cache/meshwork/dev, loopback only), deploys the example `hello` function on it as the
# demo workload and calls it over HTTP, then keeps the node in the foreground until Ctrl-C.
# (Needs the WASI target for the example: `rustup target add wasm32-wasip1`.)
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

cargo build --release --target wasm32-wasip1 --manifest-path examples/Cargo.toml -p hello
"$bin/meshctl" fn deploy hello examples/target/wasm32-wasip1/release/hello.wasm --memory 64Mi --timeout 5s
echo
"$bin/meshctl" nodes
echo
"$bin/meshctl" fn ls
echo
curl -s 'http://127.0.0.1:8080/fn/hello?name=meshwork'
echo
echo "The node runs until Ctrl-C. Try: curl 'http://127.0.0.1:8080/fn/hello?name=you' ;"
echo "  $bin/meshctl fn stats hello ; $bin/meshctl nodes --json ; curl -s http://127.0.0.1:8080/metrics"
wait $node
