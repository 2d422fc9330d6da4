#!/usr/bin/env bash
# bench/batch/run.sh: batch jobs, the benchmark of the batch issue, in one run on this machine.
#
#  (p) The placement core alone: bench/batch/placement (its own crate, a path dependency on
#      node/) calls meshwork_node::placement::place on 1,000 simulated nodes, pinned to one
#      core (`taskset -c 0`): placements per second for 1,000 single-replica jobs (one call;
#      one new job per scheduler pass; a pass with nothing new), and the packed capacity
#      against a greedy bin-packing oracle when jobs ask for more than the nodes have (goals:
#      >= 750 placements/s per core; within 12 % of the oracle). See its src/main.rs.
#  (l) Local baseline: the same 1,000 runs of examples/task (`task.wasm --sum 1000`) with
#      `seq 0 999 | xargs -P 2` of bench/batch/runner (its own crate: the Wasmer 7.4 and
#      wasmer-wasix versions of meshd, from the root Cargo.lock, built --offline), a fresh
#      process per job that loads the compiled module (compiled once before, as meshd keeps
#      the module it compiled), runs it as a WASI command with MESH_JOB_INDEX set and writes its
#      output to a log file per job, as a node does. Measured before and after the mesh runs.
#      Also, for reference, a few runs that compile the module in every process
#      (`batch-runner compile-run`, like a WASI CLI without a compilation cache).
#  (m) The mesh: three meshd on 127.0.0.1 (distinct ports and data dirs, --no-mdns, n1 and n2
#      --join n0), each offering `--cpu $NODE_CPU` (default 1: 3 cores declared on a 2-core
#      machine) so that placement is bounded by capacity: jobs ask for --cpu 100m --memory
#      16Mi, so at most 10 run on a node at once. A warm-up job (an array of 6, so that every
#      node has compiled the module; its time is printed, not part of the result). Then one
#      array job of 1,000: t0 = just before `meshctl job submit --name t --wasm task.wasm
#      --args='--sum 1000' --array 1000 --cpu 100m --memory 16Mi` (the upload of the module,
#      already in the mesh, is part of it), polled with `meshctl job show ID --json` every
#      200 ms (bench/batch/jobwait.py) until every index SUCCEEDED or FAILED. Total time = the
#      latest attempt's end (recorded by the node, same host clock) - t0; the poll that saw it
#      is printed too. Ratio (1000 / total) / local jobs per second (goal >= 0.5).
#  (s) With SEPARATE=1 (default): the same 1,000 as separate submissions (`meshctl job submit`
#      without --array, 2 at a time with xargs -P 2, round robin over the three nodes) on a
#      fresh mesh (new data dirs, so the first part's 1,000 finished indices are not in its
#      job table), timed from the first submit to the latest attempt's end; and the p50 of 20
#      sequential `job submit` calls before and after the 1,000 (next to `meshctl nodes`).
#
# Root is not needed (Wasm jobs only; meshd connects to containerd if it runs, in a namespace
# mwbatch-<pid> removed at exit), but the build of the runner and the placement bench needs
# the registry cache (cargo --offline --locked):
#   cd /work/main
#   cargo build --release -p meshwork-node -p meshwork-client --bins
#   rustup target add wasm32-wasip1
#   cargo build --release --target wasm32-wasip1 --manifest-path examples/Cargo.toml
#   bench/batch/run.sh           # about 1-1.5 minutes with the defaults (+ the first build of
#                                # the runner and the placement bench, 5-10 minutes)
# Knobs (environment): JOBS=1000 SUM=1000 NODE_CPU=1 JOB_CPU=100m JOB_MEMORY=16Mi LOCAL_P=2
#   SEPARATE=1 COMPILE_RUN_JOBS=50 PARTS="p l m s" PORT_BASE=18900 (node i: p2p BASE+10i,
#   gRPC +1, HTTP +2) TIMEOUT=30 (bound of every wait, s) JOB_TIMEOUT=600 (bound of waiting for
#   the jobs, s) DEADLINE=1800 (the whole run, s) MESHD=… MESHCTL=… WASM=…
#   BUILD_DIR=<root>/target (cargo target dir of the two small crates; the default shares the
#   main one so that the compiled dependencies are reused) STOP_WAIT=30 (SIGTERM -> SIGKILL, s)
#   KEEP_WORK=1.
# Every process it starts is stopped by pid on exit (trap, also on failure and Ctrl-C), and
# the work dir is removed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MESHD=${MESHD:-$ROOT/target/release/meshd}
MESHCTL=${MESHCTL:-$ROOT/target/release/meshctl}
WASM=${WASM:-$ROOT/examples/target/wasm32-wasip1/release/task.wasm}
JOBS=${JOBS:-1000}
SUM=${SUM:-1000}
NODE_CPU=${NODE_CPU:-1}
JOB_CPU=${JOB_CPU:-100m}
JOB_MEMORY=${JOB_MEMORY:-16Mi}
LOCAL_P=${LOCAL_P:-2}
SEPARATE=${SEPARATE:-1}
COMPILE_RUN_JOBS=${COMPILE_RUN_JOBS:-50}
PARTS=${PARTS:-p l m s}
PORT_BASE=${PORT_BASE:-18900}
TIMEOUT=${TIMEOUT:-30}
JOB_TIMEOUT=${JOB_TIMEOUT:-600}
DEADLINE=${DEADLINE:-1800}
BUILD_DIR=${BUILD_DIR:-$ROOT/target}
KEEP_WORK=${KEEP_WORK:-0}
[ "$SEPARATE" = 1 ] || PARTS=${PARTS// s/}
NS=mwbatch-$$
RUST_LOG_NODE="info,libp2p_kad=error,libp2p_gossipsub=warn,libp2p_mdns=warn"

T0=$(date +%s.%N)
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "bench/batch: $*" >&2; exit 1; }
now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.1f", n / s; else printf "n/a" }'; }

# ---------------------------------------------------------------- prerequisites
for f in "$MESHD" "$MESHCTL"; do
    [ -x "$f" ] || die "$f missing: cargo build --release -p meshwork-node -p meshwork-client --bins"
done
[ -f "$WASM" ] || die "$WASM missing: cargo build --release --target wasm32-wasip1 --manifest-path examples/Cargo.toml"
command -v python3 >/dev/null || die "python3 missing"
command -v taskset >/dev/null || die "taskset missing (util-linux)"
for i in 0 1 2; do
    for p in $((PORT_BASE + 10 * i)) $((PORT_BASE + 10 * i + 1)) $((PORT_BASE + 10 * i + 2)); do
        if ss -Hltn "sport = :$p" | grep -q .; then die "port $p is in use (set PORT_BASE)"; fi
    done
done

WORK=$(mktemp -d /tmp/meshwork-bench-batch.XXXXXX)
declare -A PID=()      # name -> pid of every long-running process this script started
declare -A STARTED=()  # pid -> start time (/proc/PID/stat field 22): a reused pid is never ours
WATCHDOG=""
STOP_FORCED=""
proc_start() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $20 }'; }
track() { STARTED[$1]=$(proc_start "$1"); STARTED[$1]=${STARTED[$1]:-gone}; }
# alive PID: ours (same start time) and neither exited nor a zombie. One read of
# /proc/PID/stat, so that state and start time come from the same instant.
alive() {
    local f
    f=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a f <<<"$f"
    [ "${#f[@]}" -gt 19 ] && [ "${f[19]}" = "${STARTED[$1]:-}" ] && [[ "${f[0]}" != [ZX] ]]
}
# stop_pid PID NAME: SIGTERM, at most STOP_WAIT (30) s, then SIGKILL; reaps it. The time from
# SIGTERM to exit is appended to $WORK/stops.txt ("NAME ms" or "NAME killed").
STOP_WAIT=${STOP_WAIT:-30}
stop_pid() {
    local pid=$1 name=${2:-$1} i t t0
    t0=$(now)
    alive "$pid" && { kill -TERM "$pid" 2>/dev/null || true; }
    local gone=0
    for i in $(seq 1 $((STOP_WAIT * 100))); do
        if ! alive "$pid"; then gone=1; break; fi
        sleep 0.01
    done
    if [ "$gone" = 0 ]; then
        echo "bench/batch: $name (pid $pid) still running $STOP_WAIT s after SIGTERM; its threads (count name state wchan):" >&2
        for t in /proc/"$pid"/task/*; do
            [ -e "$t/stat" ] || continue
            echo "$(cat "$t/comm" 2>/dev/null) $(sed 's/^.*) //' "$t/stat" 2>/dev/null | awk '{ print $1 }') $(cat "$t/wchan" 2>/dev/null)"
        done | sort | uniq -c | sed 's/^/    /' >&2
        echo "bench/batch: SIGKILL $name" >&2
        STOP_FORCED+=" $name"
        kill -KILL "$pid" 2>/dev/null || true
        [ -d "$WORK" ] && echo "$name killed" >>"$WORK/stops.txt"
    else
        t=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
        [ -d "$WORK" ] && echo "$name $t" >>"$WORK/stops.txt"
    fi
    wait "$pid" 2>/dev/null || true
}
# meshd may create its containerd namespace (unused here: Wasm jobs only); remove it if so.
remove_namespace() {
    command -v ctr >/dev/null || return 0
    if grep -qx "$NS" <<<"$(ctr --connect-timeout 2s namespaces ls -q 2>/dev/null)"; then
        ctr namespaces rm "$NS" >/dev/null 2>&1 || echo "bench/batch: could not remove containerd namespace $NS" >&2
    fi
}
cleanup() {
    local rc=$? name
    set +e
    trap - EXIT INT TERM
    if [ -n "$WATCHDOG" ]; then kill -TERM "$WATCHDOG" 2>/dev/null; wait "$WATCHDOG" 2>/dev/null; fi
    for name in "${!PID[@]}"; do
        stop_pid "${PID[$name]}" "$name"
    done
    if [ "$rc" != 0 ]; then
        echo "bench/batch: failed (exit $rc); meshd WARN/ERROR lines and last lines:" >&2
        for f in "$WORK"/n*.log; do
            [ -f "$f" ] || continue
            echo "--- $f" >&2
            grep -E ' (WARN|ERROR) ' "$f" | tail -n 10 >&2
            tail -n 10 "$f" >&2
        done
    fi
    remove_namespace
    if [ "$KEEP_WORK" = 1 ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
(
    trap 'kill "$sp" 2>/dev/null; exit 0' TERM
    sleep "$DEADLINE" & sp=$!
    wait "$sp"
    echo "bench/batch: deadline of $DEADLINE s reached; stopping" >&2
    kill -TERM $$
) &
WATCHDOG=$!

mkdir -p "$WORK/bin"
cp "$MESHD" "$MESHCTL" "$WASM" "$WORK/bin/"   # a rebuild during the run cannot swap them
MESHD_BUILT=$(date -u -r "$MESHD" '+%Y-%m-%d %H:%M UTC')
MESHD_SHA=$(sha256sum "$MESHD" | cut -c1-12)
MESHD=$WORK/bin/meshd MESHCTL=$WORK/bin/meshctl WASM=$WORK/bin/task.wasm
grpc() { echo "http://127.0.0.1:$((PORT_BASE + 10 * $1 + 1))"; }
meshctl() { timeout "$TIMEOUT" "$MESHCTL" --endpoint "$(grpc 0)" "$@"; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "bench/batch $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $(nproc) cores, load average $LOAD_START at start"
log "meshd: $MESHD_BUILT, sha256 $MESHD_SHA; module $(basename "$WASM") ($(stat -c %s "$WASM") bytes); work dir $WORK"
OTHER_MESHD=$(pgrep -x meshd | wc -l || true)
log "other meshd processes running: $OTHER_MESHD"

# ---------------------------------------------------------------- builds (before anything is timed)
build() {  # CRATE_DIR BIN
    local t log_
    t=$(now)
    log_="$WORK/build-$2.log"
    if ! (cd "$1" && CARGO_TARGET_DIR="$BUILD_DIR" timeout 1500 cargo build --release --offline --locked) >"$log_" 2>&1; then
        tail -n 30 "$log_" >&2
        die "cannot build $1 (cargo --offline --locked)"
    fi
    log "  built $2 in $(secs_since "$t") s"
    cp "$BUILD_DIR/release/$2" "$WORK/bin/"
}
if want p; then
    log "building bench/batch/placement (path dependency on node/)"
    build "$HERE/placement" placement-bench
fi
if want l; then
    log "building bench/batch/runner (wasmer $(awk '/^name = "wasmer"$/ { getline; print $3 }' "$HERE/runner/Cargo.lock" | tr -d '"'), wasmer-wasix $(awk '/^name = "wasmer-wasix"$/ { getline; print $3 }' "$HERE/runner/Cargo.lock" | tr -d '"'))"
    build "$HERE/runner" batch-runner
    RUNNER=$WORK/bin/batch-runner
    t=$(now)
    "$RUNNER" compile "$WASM" "$WORK/task.bin"
    COMPILE_S=$(secs_since "$t")
    mkdir -p "$WORK/local-logs"
    MESH_JOB_INDEX=0 "$RUNNER" run "$WORK/task.bin" "$WORK/local-logs/check.log" --sum "$SUM" ||
        die "the runner failed: $(cat "$WORK/local-logs/check.log")"
    grep -q "sum=$((SUM * (SUM + 1) / 2))" "$WORK/local-logs/check.log" || die "unexpected output: $(cat "$WORK/local-logs/check.log")"
    log "  compiled task.wasm once in $COMPILE_S s (not part of the local time); one run prints: $(tr '\n' ' ' <"$WORK/local-logs/check.log")"
fi

# ================================================================ (p)
if want p; then
    log "(p) placement core on one core: taskset -c 0 placement-bench --nodes 1000 --jobs 1000"
    taskset -c 0 "$WORK/bin/placement-bench" --nodes 1000 --jobs 1000 | tee "$WORK/placement.txt"
fi

# ================================================================ (l)
# CHILD_CPU = CPU seconds (user + sys) of this shell's reaped children so far (bash `times`, 2nd
# line). Not to be called in $(...) or a pipe: `times` in a subshell sees only the subshell.
CHILD_CPU=0
children_cpu() {
    times >"$WORK/times.txt"
    CHILD_CPU=$(sed -n 2p "$WORK/times.txt" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub(/s$/, "", p[2]); s += p[1] * 60 + p[2] } printf "%.3f", s }')
}
# local RUN_LABEL: $JOBS runs with xargs -P $LOCAL_P; appends "label seconds failures" to local.txt
local_run() {
    local label=$1 t s fails
    rm -rf "$WORK/local-logs"; mkdir -p "$WORK/local-logs"
    local c0 c1
    children_cpu; c0=$CHILD_CPU
    t=$(now)
    seq 0 $((JOBS - 1)) | timeout "$JOB_TIMEOUT" xargs -P "$LOCAL_P" -I{} env MESH_JOB_INDEX={} \
        "$RUNNER" run "$WORK/task.bin" "$WORK/local-logs/{}.log" --sum "$SUM" >/dev/null 2>&1 || true
    s=$(secs_since "$t")
    children_cpu; c1=$CHILD_CPU
    LOCAL_CPU_MS=$(awk -v a="$c0" -v b="$c1" -v n="$JOBS" 'BEGIN { printf "%.1f", (b - a) / n * 1000 }')
    fails=$(( JOBS - $(grep -l "sum=$((SUM * (SUM + 1) / 2))" "$WORK"/local-logs/*.log 2>/dev/null | wc -l) ))
    echo "$label $s $fails $LOCAL_CPU_MS" >>"$WORK/local.txt"
    log "  local ($label): $JOBS runs, xargs -P $LOCAL_P: $s s = $(rate "$JOBS" "$s") jobs/s; CPU $LOCAL_CPU_MS ms per run (user+sys of the runner processes, xargs, env); runs without the right output: $fails"
}
if want l; then
    log "(l) local baseline: seq 0 $((JOBS - 1)) | xargs -P $LOCAL_P -I{} env MESH_JOB_INDEX={} batch-runner run task.bin LOG --sum $SUM"
    local_run before
fi

# ================================================================ (m), (s)
# start_mesh TAG: three meshd, n1 and n2 joining n0; waits until each sees 3 alive.
start_mesh() {
    local tag=$1 i args p g h
    "$MESHCTL" secret new >"$WORK/secret-$tag"
    for i in 0 1 2; do
        p=$((PORT_BASE + 10 * i)) g=$((PORT_BASE + 10 * i + 1)) h=$((PORT_BASE + 10 * i + 2))
        args=(--data-dir "$WORK/data-$tag-n$i" --secret-file "$WORK/secret-$tag" --p2p "127.0.0.1:$p"
            --grpc "127.0.0.1:$g" --http "127.0.0.1:$h" --name "n$i" --no-mdns --cpu "$NODE_CPU"
            --containerd-namespace "$NS")
        [ "$i" -gt 0 ] && args+=(--join "127.0.0.1:$PORT_BASE")
        echo "=== $(date -u +%H:%M:%S.%N) start ($tag)" >>"$WORK/n$i.log"
        RUST_LOG=$RUST_LOG_NODE "$MESHD" "${args[@]}" >>"$WORK/n$i.log" 2>&1 &
        PID[n$i]=$!
        track $!
    done
    local ok=0 n js
    for n in $(seq 1 $((TIMEOUT * 10))); do
        ok=0
        for i in 0 1 2; do
            js=$(timeout 5 "$MESHCTL" --endpoint "$(grpc $i)" nodes --json 2>/dev/null || true)
            [ "$(grep -c '"alive"' <<<"$js" || true)" -ge 3 ] && ok=$((ok + 1))
        done
        [ "$ok" = 3 ] && break
        sleep 0.1
    done
    [ "$ok" = 3 ] || die "the three nodes do not all see 3 alive after $TIMEOUT s"
}
stop_mesh() {
    local i
    for i in 0 1 2; do
        [ -n "${PID[n$i]:-}" ] && { stop_pid "${PID[n$i]}" "n$i"; unset "PID[n$i]"; }
    done
}
# submit_array LABEL N: one array job of N; waits; leaves the summary in $WORK/LABEL.json
submit_array() {
    local label=$1 n=$2 t0 id
    t0=$(now)
    id=$(meshctl job submit --name "$label" --wasm "$WASM" --args="--sum $SUM" --array "$n" \
        --cpu "$JOB_CPU" --memory "$JOB_MEMORY") || die "job submit failed"
    echo "$(secs_since "$t0")" >"$WORK/$label.submit_s"
    python3 "$HERE/jobwait.py" --meshctl "$MESHCTL" --endpoint "$(grpc 0)" --t0 "$t0" --id "$id" \
        --expect "$n" --interval 0.2 --timeout "$JOB_TIMEOUT" --out "$WORK/$label.json" ||
        die "$label: the job did not end within $JOB_TIMEOUT s: $(cat "$WORK/$label.json")"
}
jfield() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); [v := v[k] for k in sys.argv[2:]]; print(v if not isinstance(v, float) else f"{v:.2f}")' "$WORK/$1.json" "${@:2}"; }
describe() {  # LABEL: one line about a finished run
    python3 - "$WORK/$1.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"    states {s['states']}, {s['attempts']} attempts, per node {dict(sorted(s['per_node'].items()))}"
      + (f", failed: {s['failed_reasons']}" if s['failed_reasons'] else ""))
print(f"    first attempt started +{s['first_start_s']:.2f} s, last ended +{s['last_end_s']:.2f} s, seen by the poller +{s['observed_s']:.2f} s;"
      f" attempt run time (start record -> end record) p50 {s['run_ms_p50']} ms, p90 {s['run_ms_p90']} ms, max {s['run_ms_max']} ms;"
      f" {s['polls']} polls, p50 {s['poll_ms_p50']:.0f} ms each")
print(f"    attempts ended per second after submit: {' '.join(str(x) for x in s['ends_per_s'])}")
EOF
}
# node_cpu_s: CPU seconds of the three meshd so far
CLK_TCK=$(getconf CLK_TCK)
node_cpu_s() {
    local i sum=0 t
    for i in 0 1 2; do
        t=$(sed 's/^.*) //' "/proc/${PID[n$i]}/stat" 2>/dev/null | awk '{ print $12 + $13 }') || t=0
        sum=$((sum + ${t:-0}))
    done
    awk -v t="$sum" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }'
}

# metric_sum NAME: a counter summed over the three nodes (all label sets).
metric_sum() {
    local i sum=0 v
    for i in 0 1 2; do
        v=$(curl -s --max-time 5 "http://127.0.0.1:$((PORT_BASE + 10 * i + 2))/metrics" | awk -v k="$1" '$1 == k || index($1, k "{") == 1 { s += $2 } END { printf "%d", s }')
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}
if want m; then
    log "(m) three meshd (--cpu $NODE_CPU each, --no-mdns, n1 n2 --join n0)"
    start_mesh m
    log "  mesh up: 3 of 3 alive on every node"
    log "  warm-up: array of 6 (every node compiles the module once)"
    submit_array warmup 6
    log "  warm-up done in $(jfield warmup last_end_s) s"; describe warmup
    log "  array of $JOBS: meshctl job submit --name t --wasm task.wasm --args '--sum $SUM' --array $JOBS --cpu $JOB_CPU --memory $JOB_MEMORY"
    c0=$(node_cpu_s); w0=$(metric_sum mesh_state_writes_total); g0=$(metric_sum mesh_gossip_messages_total)
    submit_array array "$JOBS"
    M_CPU=$(awk -v a="$c0" -v b="$(node_cpu_s)" 'BEGIN { printf "%.2f", b - a }')
    M_WRITES=$(( $(metric_sum mesh_state_writes_total) - w0 )); M_GOSSIP=$(( $(metric_sum mesh_gossip_messages_total) - g0 ))
    log "  array of $JOBS done: $(jfield array last_end_s) s after submit (submit call $(cat "$WORK/array.submit_s") s); meshd CPU (3 nodes) $M_CPU s"
    describe array
    # Were the module's compiled artifacts reused? (meshd's metrics)
    M_METRICS=""
    for i in 0 1 2; do
        M_METRICS+="n$i: $(curl -s --max-time 5 "http://127.0.0.1:$((PORT_BASE + 10 * i + 2))/metrics" | grep -E '^mesh_fn_artifact_cache_total' | sed 's/mesh_fn_artifact_cache_total//' | tr '\n' ' ')  "
    done
    stop_mesh
fi

if want l; then
    local_run after
    if [ "$COMPILE_RUN_JOBS" -gt 0 ]; then
        rm -rf "$WORK/cr-logs"; mkdir -p "$WORK/cr-logs"
        t=$(now)
        seq 0 $((COMPILE_RUN_JOBS - 1)) | timeout "$JOB_TIMEOUT" xargs -P "$LOCAL_P" -I{} env MESH_JOB_INDEX={} \
            "$RUNNER" compile-run "$WASM" "$WORK/cr-logs/{}.log" --sum "$SUM" >/dev/null 2>&1 || true
        CR_S=$(secs_since "$t")
        log "  local, compiling in every process (reference): $COMPILE_RUN_JOBS runs in $CR_S s = $(rate "$COMPILE_RUN_JOBS" "$CR_S") jobs/s"
    fi
fi

if want s; then
    log "(s) $JOBS separate submissions on a fresh mesh (xargs -P 2, round robin over the nodes)"
    start_mesh s
    log "  mesh up"
    # warm-up as in (m)
    submit_array warmup-s 6
    log "  warm-up done in $(jfield warmup-s last_end_s) s"
    # What one submission costs the client: 20 sequential `job submit` (module upload + submit)
    # next to 20 `meshctl nodes` (process start + connection + one call), p50; here with only
    # the warm-up job in the mesh, and again once the 1,000 are in.
    one_ms() {  # CMD...: p50 of 20 sequential runs, ms
        local i t v=()
        for i in $(seq 1 20); do t=$(now); "$@" >/dev/null 2>&1 || true; v+=("$(awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) * 1000 }')"); done
        printf '%s\n' "${v[@]}" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
    }
    S_ONE_SUBMIT0=$(one_ms timeout 30 "$MESHCTL" --endpoint "$(grpc 0)" job submit --name one --wasm "$WASM" --args="--sum $SUM" --cpu "$JOB_CPU" --memory "$JOB_MEMORY")
    S_ONE_NODES0=$(one_ms timeout 30 "$MESHCTL" --endpoint "$(grpc 0)" nodes --json)
    sleep 1   # let those 20 jobs finish
    : >"$WORK/ids.txt"
    t0=$(now)
    seq 0 $((JOBS - 1)) | timeout "$JOB_TIMEOUT" xargs -P 2 -I{} sh -c \
        'i={}; timeout 30 "$1" --endpoint "http://127.0.0.1:$(( $2 + 10 * (i % 3) + 1 ))" job submit --name "s$i" --wasm "$3" --args="--sum $4" --cpu "$5" --memory "$6"' \
        _ "$MESHCTL" "$PORT_BASE" "$WASM" "$SUM" "$JOB_CPU" "$JOB_MEMORY" >"$WORK/ids.txt" 2>"$WORK/submit-errors.txt" || true
    S_SUBMIT=$(secs_since "$t0")
    S_IDS=$(grep -c . "$WORK/ids.txt" || true)
    log "  $S_IDS of $JOBS submitted in $S_SUBMIT s ($(rate "$S_IDS" "$S_SUBMIT") submits/s); errors: $(sort "$WORK/submit-errors.txt" | uniq -c | head -n 3 | tr '\n' ' ')"
    c0=$(node_cpu_s)
    python3 "$HERE/jobwait.py" --meshctl "$MESHCTL" --endpoint "$(grpc 0)" --t0 "$t0" --ids-file "$WORK/ids.txt" \
        --expect "$S_IDS" --interval 1 --timeout "$JOB_TIMEOUT" --out "$WORK/separate.json" ||
        die "separate: the jobs did not end within $JOB_TIMEOUT s: $(cat "$WORK/separate.json")"
    log "  $S_IDS separate jobs done: $(jfield separate last_end_s) s after the first submit"
    describe separate
    S_ONE_SUBMIT=$(one_ms timeout 30 "$MESHCTL" --endpoint "$(grpc 0)" job submit --name one --wasm "$WASM" --args="--sum $SUM" --cpu "$JOB_CPU" --memory "$JOB_MEMORY")
    S_ONE_NODES=$(one_ms timeout 30 "$MESHCTL" --endpoint "$(grpc 0)" nodes --json)
    log "  one client call, p50 of 20 sequential: job submit --wasm (upload + submit) $S_ONE_SUBMIT0 ms before the $JOBS, $S_ONE_SUBMIT ms after; meshctl nodes --json $S_ONE_NODES0 / $S_ONE_NODES ms"
    stop_mesh
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ================================================================ summary
echo
echo "==================== bench/batch summary ===================="
if want p; then
    echo "(p) placement core, one core (taskset -c 0):"
    grep -E '^  (array|mixed)|^  +incremental|worst ratio' "$WORK/placement.txt" | sed 's/^/  /'
fi
if want l; then
    LB=$(awk '$1 == "before" { print $2 }' "$WORK/local.txt"); LA=$(awk '$1 == "after" { print $2 }' "$WORK/local.txt")
    LB=${LB:-0} LA=${LA:-0}
    echo "(l) local: $JOBS runs of task.wasm --sum $SUM, xargs -P $LOCAL_P, a process per run (artifact compiled once, $COMPILE_S s):"
    echo "    before the mesh: $LB s = $(rate "$JOBS" "$LB") jobs/s;  after: $LA s = $(rate "$JOBS" "$LA") jobs/s   (failures: $(awk '{ printf "%s ", $3 }' "$WORK/local.txt"))"
    [ "$COMPILE_RUN_JOBS" -gt 0 ] && echo "    compiling in every process (reference): $(rate "$COMPILE_RUN_JOBS" "$CR_S") jobs/s"
fi
if want m; then
    MT=$(jfield array last_end_s)
    echo "(m) mesh: 3 meshd (--cpu $NODE_CPU each), one array job of $JOBS (--cpu $JOB_CPU --memory $JOB_MEMORY): submit -> last attempt ended $MT s = $(rate "$JOBS" "$MT") jobs/s"
    describe array
    echo "    meshd CPU, 3 nodes, while the array ran: $M_CPU s ($(awk -v c="$M_CPU" -v n="$JOBS" 'BEGIN { printf "%.1f", c / n * 1000 }') ms per job$(want l && echo "; local: $(awk '$1 == "before" { print $4 }' "$WORK/local.txt") ms per run")); artifact cache per node: $M_METRICS"
    echo "    replicated-state writes (mesh_state_writes_total, each a durable commit on the writing node) during the array: $M_WRITES ($(awk -v w="$M_WRITES" -v n="$JOBS" 'BEGIN { printf "%.1f", w / n }') per job); gossip messages in+out, all nodes: $M_GOSSIP"
    if want l; then
        echo "    ratio mesh / local jobs/s: $(ratio "$(rate "$JOBS" "$MT")" "$(rate "$JOBS" "$LB")") (local before) / $(ratio "$(rate "$JOBS" "$MT")" "$(rate "$JOBS" "$LA")") (local after)   (goal >= 0.5)"
    fi
fi
if want s; then
    ST=$(jfield separate last_end_s)
    echo "(s) mesh, $S_IDS separate submissions (xargs -P 2 over the 3 nodes): submitting took $S_SUBMIT s; first submit -> last attempt ended $ST s = $(rate "$S_IDS" "$ST") jobs/s"
    describe separate
    if want l; then
        echo "    ratio mesh / local jobs/s: $(ratio "$(rate "$S_IDS" "$ST")" "$(rate "$JOBS" "$LB")") (local before) / $(ratio "$(rate "$S_IDS" "$ST")" "$(rate "$JOBS" "$LA")") (local after)"
    fi
    echo "    one client call, p50 of 20 sequential: meshctl job submit --wasm (upload + submit) $S_ONE_SUBMIT0 ms with 1-21 jobs in the mesh, $S_ONE_SUBMIT ms with $((S_IDS + 21))-$((S_IDS + 41)); meshctl nodes --json $S_ONE_NODES0 / $S_ONE_NODES ms"
fi
echo "meshd WARN/ERROR log lines (all nodes, all parts), by message:"
W=$(cat "$WORK"/n*.log 2>/dev/null | grep -E ' (WARN|ERROR) ' | sed -E 's/^[^ ]+ +//; s/ [a-z_.]+=.*$//' | sort | uniq -c | sort -rn | head -n 15 || true)
if [ -n "$W" ]; then echo "$W" | sed 's/^/   /'; else echo "   none"; fi
echo "meshd stops, SIGTERM -> exit in ms (in stop order; 'killed': SIGKILL after $STOP_WAIT s): $(awk '{ printf "%s %s, ", $1, $2 }' "$WORK/stops.txt" 2>/dev/null | sed 's/, $//')"
echo "machine: $(nproc) cores, shared with other engineers' builds and chaos tests; load average at start $LOAD_START, at end $LOAD_END; other meshd processes at start: $OTHER_MESHD"
echo "meshd build: $MESHD_BUILT, sha256 $MESHD_SHA, tree $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- node proto client 2>/dev/null || echo '+uncommitted changes')"
echo "wall time: $(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s"
