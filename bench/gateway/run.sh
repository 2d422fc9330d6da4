#!/usr/bin/env bash
# bench/gateway/run.sh: the API gateway under load next to Debian's nginx, in one run on this
# machine (the benchmark of the gateway issue).
#
# Upstream: one replica of a mesh service `up`, a tiny static hyper server that keeps client
# connections open (the server of bench/container part (c), built here with cargo --offline,
# statically linked, in an OCI image made by bench/container/make-image.py), so that what is
# measured is the proxies and not the upstream's connection handling. One meshd on 127.0.0.1
# runs it through containerd (its own namespace mwgw-<pid>); the replica shares the host's
# network namespace, and nginx is pointed at the replica's port: both proxies forward to the
# very same process.
#
# Paths, each `wrk -t1 -c16 -d10s --latency` after a 2 s warm-up (ROUNDS rounds; the order of
# the paths is reversed every other round, so that slow drift of the shared machine's load
# hits both proxies alike):
#   direct          wrk -> the replica's port (reference for "added" latency)
#   nginx           wrk -> nginx (worker_processes 1, upstream keepalive 32, HTTP/1.1) -> replica
#   gateway         wrk -> meshd's gateway, route /open --service up (no auth)
#   nginx-keyed     nginx that also checks the x-api-key header against the one key (a `map`,
#                   401 otherwise) and throttles per key (`limit_req` keyed on it, 1000000 r/s,
#                   burst 1000000, nodelay): the nginx counterpart of a key + plan
#   gateway-keyed   route /keyed --service up --auth key --plan bench, with a plan whose limits
#                   are never reached (--rate 1000000/s --burst 1000000 --quota 1000000000/day)
#                   and the key in x-api-key: key lookup (hash), plan check, the mesh-wide token
#                   bucket and the daily quota counter on every request
# With PACED=1 (default) every round also runs the five paths "paced" (a wrk script makes each
# connection wait PACED_DELAY_MS=4 ms before each request: at most about 4000 req/s offered, far
# below every path's capacity), so that the p99 each proxy adds is compared at equal load: at
# saturation the paths run at very different rates and the direct path's p99 is mostly wrk and
# the server fighting for the 2 cores, not a baseline for "added" latency.
# meshd runs with RUST_LOG=info,...,meshwork_node::gateway::access=off: the access log (one
# line per request) is off for the paths above, as nginx's is (`access_log off`). With
# ACCESS_LOG=1 (default) meshd is then restarted on the same data dir with the access log on
# (its replica is adopted, not restarted) and gateway / gateway-keyed are measured once more.
#
# Printed: req/s, p50/p90/p99, CPU per request of the proxy (meshd, or nginx's master and
# worker) and of the replica (its cgroup); per round, the ratio gateway / nginx of req/s
# (goal >= 0.9) and of the p99 each adds to the same round's direct p99 (goal <= 1.2), and
# their median over the rounds, for both pairs, at saturation and paced; the gateway's own
# counters (`meshctl gateway stats`) to show nothing was throttled or failed.
#
# Run as root (containerd, cgroups; apt-installs wrk/nginx/curl if missing):
#   cd /work/main
#   cargo build --release -p meshwork-node -p meshwork-client --bins
#   bench/gateway/run.sh          # about 7 minutes with the defaults
# Knobs (environment): ROUNDS=3 ACCESS_LOG=1 PACED=1 PACED_DELAY_MS=4 WRK_DURATION=10s WRK_WARMUP=2s WRK_CONNECTIONS=16
#   WRK_THREADS=1 PORT_BASE=18800 (meshd p2p/gRPC/HTTP = BASE..BASE+2, nginx BASE+10..11)
#   UP_CPU=2 UP_MEMORY=32Mi TIMEOUT=30 (bound of every wait, s) DEADLINE=900 (the whole run, s)
#   MESHD=… MESHCTL=… KEEP_WORK=1 (keep the work dir with the logs and wrk outputs).
# Every process it starts is stopped by pid on exit (trap, also on failure and Ctrl-C); the
# containerd namespace it made is emptied and removed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MESHD=${MESHD:-$ROOT/target/release/meshd}
MESHCTL=${MESHCTL:-$ROOT/target/release/meshctl}
ROUNDS=${ROUNDS:-3}
ACCESS_LOG=${ACCESS_LOG:-1}
PACED=${PACED:-1}
PACED_DELAY_MS=${PACED_DELAY_MS:-4}
WRK_DURATION=${WRK_DURATION:-10s}
WRK_WARMUP=${WRK_WARMUP:-2s}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-16}
WRK_THREADS=${WRK_THREADS:-1}
PORT_BASE=${PORT_BASE:-18800}
UP_CPU=${UP_CPU:-2}
UP_MEMORY=${UP_MEMORY:-32Mi}
TIMEOUT=${TIMEOUT:-30}
DEADLINE=${DEADLINE:-900}
KEEP_WORK=${KEEP_WORK:-0}
PG=$PORT_BASE GG=$((PORT_BASE + 1)) HG=$((PORT_BASE + 2))
NGX=$((PORT_BASE + 10)) NGX_KEYED=$((PORT_BASE + 11))
NS=mwgw-$$
TOKEN="meshwork-bench-gateway-$$-$RANDOM$RANDOM"
RUST_LOG_QUIET="info,libp2p_kad=error,libp2p_gossipsub=warn,meshwork_node::gateway::access=off"
RUST_LOG_ACCESS="info,libp2p_kad=error,libp2p_gossipsub=warn"

T0=$(date +%s.%N)
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "bench/gateway: $*" >&2; exit 1; }
now() { date +%s.%N; }
ms_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }

# ---------------------------------------------------------------- prerequisites
[ "$(id -u)" = 0 ] || die "run as root (containerd, cgroups)"
for f in "$MESHD" "$MESHCTL"; do
    [ -x "$f" ] || die "$f missing: cargo build --release -p meshwork-node -p meshwork-client --bins"
done
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v python3 >/dev/null || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -r /bin/busybox ] || die "/bin/busybox missing (apt-get install busybox-static; make-image.py puts it in the image)"
if ! ctr --connect-timeout 2s version >/dev/null 2>&1; then
    log "containerd does not answer; starting it with scripts/start-containerd.sh"
    "$ROOT/scripts/start-containerd.sh"
fi
for p in $PG $GG $HG $NGX $NGX_KEYED; do
    if ss -Hltn "sport = :$p" | grep -q .; then die "port $p is in use (set PORT_BASE)"; fi
done
grep -qx "$NS" <<<"$(ctr namespaces ls -q)" && die "containerd namespace $NS exists already"

WORK=$(mktemp -d /tmp/meshwork-bench-gateway.XXXXXX)
declare -A PID=()      # name -> pid of every long-running process this script started
declare -A STARTED=()  # pid -> start time (/proc/PID/stat field 22): a reused pid is never ours
NS_MADE=0
WATCHDOG=""
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
# stop_pid PID NAME: SIGTERM, at most 10 s, then SIGKILL; reaps it.
stop_pid() {
    local pid=$1 name=${2:-$1} i
    alive "$pid" && { kill -TERM "$pid" 2>/dev/null || true; }
    for i in $(seq 1 1000); do alive "$pid" || break; sleep 0.01; done
    if alive "$pid"; then
        echo "bench/gateway: $name (pid $pid) still running 10 s after SIGTERM; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
# The containerd namespace: kill every task, remove tasks, containers (with their
# snapshots), images, the namespace, and the empty cgroup directories of its containers.
remove_namespace() {
    local c i
    for c in $(ctr -n "$NS" containers ls -q 2>/dev/null); do
        ctr -n "$NS" task kill -s SIGKILL "$c" >/dev/null 2>&1
    done
    sleep 0.3
    for c in $(ctr -n "$NS" containers ls -q 2>/dev/null); do
        ctr -n "$NS" task rm -f "$c" >/dev/null 2>&1
        ctr -n "$NS" container rm "$c" >/dev/null 2>&1
    done
    for i in $(ctr -n "$NS" images ls -q 2>/dev/null); do
        ctr -n "$NS" images rm --sync "$i" >/dev/null 2>&1
    done
    if ! ctr namespaces rm "$NS" >/dev/null 2>&1; then
        echo "bench/gateway: could not remove containerd namespace $NS:" >&2
        ctr -n "$NS" containers ls >&2; ctr -n "$NS" snapshots ls >&2; ctr -n "$NS" content ls >&2
    fi
    find /sys/fs/cgroup -depth -type d \( -path "*/$NS" -o -path "*/$NS/*" \) -exec rmdir {} \; 2>/dev/null
}
cleanup() {
    local rc=$? name
    set +e
    trap - EXIT INT TERM
    if [ -n "$WATCHDOG" ]; then kill -TERM "$WATCHDOG" 2>/dev/null; wait "$WATCHDOG" 2>/dev/null; fi
    for name in nginx meshd; do
        [ -n "${PID[$name]:-}" ] && stop_pid "${PID[$name]}" "$name"
    done
    if [ "$rc" != 0 ] && [ -f "$WORK/meshd.log" ]; then
        echo "bench/gateway: failed (exit $rc); meshd WARN/ERROR lines and last lines:" >&2
        grep -E ' (WARN|ERROR) ' "$WORK/meshd.log" | tail -n 20 >&2
        tail -n 20 "$WORK/meshd.log" >&2
        [ -f "$WORK/nginx/error.log" ] && tail -n 5 "$WORK/nginx/error.log" >&2
    fi
    [ "$NS_MADE" = 1 ] && remove_namespace
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
    echo "bench/gateway: deadline of $DEADLINE s reached; stopping" >&2
    kill -TERM $$
) &
WATCHDOG=$!

mkdir -p "$WORK/bin"
cp "$MESHD" "$MESHCTL" "$WORK/bin/"   # a rebuild during the run cannot swap them
MESHD_BUILT=$(date -u -r "$MESHD" '+%Y-%m-%d %H:%M UTC')
MESHD_SHA=$(sha256sum "$MESHD" | cut -c1-12)
MESHD=$WORK/bin/meshd MESHCTL=$WORK/bin/meshctl
meshctl() { timeout "$TIMEOUT" "$MESHCTL" --endpoint "http://127.0.0.1:$GG" "$@"; }

# ---------------------------------------------------------------- statistics / wrk helpers
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local pid sum=0 t
    for pid in "$@"; do
        t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}
# CPU time of the replica's cgroup (cgroup v1 cpuacct or v2 cpu.stat), in µs; empty if not found.
CG_USAGE=""
cgroup_usage_us() {
    [ -n "$CG_USAGE" ] || return 0
    case "$CG_USAGE" in
        */cpuacct.usage) awk '{ printf "%d", $1 / 1000 }' "$CG_USAGE" ;;
        *) awk '$1 == "usage_usec" { print $2 }' "$CG_USAGE" ;;
    esac
}
find_cgroup() {  # container id -> sets CG_USAGE
    CG_USAGE=$(find /sys/fs/cgroup -path "*/$NS/$1/cpuacct.usage" 2>/dev/null | head -n 1)
    [ -n "$CG_USAGE" ] || CG_USAGE=$(find /sys/fs/cgroup -path "*/$NS/$1/cpu.stat" 2>/dev/null | head -n 1)
}
# run_wrk LABEL ROUND URL [-H HEADER] -- PID...: wrk after a warm-up; appends "LABEL ROUND rps
# p50 p90 p99 non2xx errors requests proxy_cpu_us_per_req replica_cpu_us_per_req" to
# $WORK/wrk.txt (CPU of PID... and of the replica's cgroup during the measured run).
run_wrk() {
    local label=$1 round=$2 url=$3 out="$WORK/wrk-$1-$2.txt" c0 c1 r0 r1
    shift 3
    local hdr=() scr=()
    if [ "${1:-}" = -H ]; then hdr=(-H "$2"); shift 2; fi
    if [ "${1:-}" = -S ]; then scr=(-s "$2"); shift 2; fi
    [ "${1:-}" = -- ] && shift
    timeout 60 wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$WRK_WARMUP" "${hdr[@]}" "${scr[@]}" "$url" >/dev/null 2>&1 || true
    c0=$(cpu_ticks "$@"); r0=$(cgroup_usage_us)
    timeout 120 wrk -t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"$WRK_DURATION" --latency "${hdr[@]}" "${scr[@]}" "$url" >"$out" 2>&1 ||
        die "wrk against $url failed: $(cat "$out")"
    c1=$(cpu_ticks "$@"); r1=$(cgroup_usage_us)
    awk -v label="$label" -v round="$round" -v cpu="$((c1 - c0))" -v np="$#" -v hz="$CLK_TCK" -v r0="$r0" -v r1="$r1" '
        function ms(s) { if (s ~ /us$/) return s * 0.001; if (s ~ /ms$/) return s + 0; if (s ~ /m$/) return s * 60000; if (s ~ /s$/) return s * 1000; return s }
        $1 == "Requests/sec:" { rps = $2 }
        $1 == "50%" { p50 = ms($2) } $1 == "90%" { p90 = ms($2) } $1 == "99%" { p99 = ms($2) }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ { errs = $0; sub(/.*Socket errors: */, "", errs); gsub(/ /, "", errs) }
        / requests in / { total = $1 }
        END {
            pc = (np > 0 && total > 0) ? sprintf("%.1f", cpu / hz * 1e6 / total) : "-"
            rc = (r0 != "" && r1 != "" && total > 0) ? sprintf("%.1f", (r1 - r0) / total) : "-"
            printf "%s %s %s %.3f %.3f %.3f %d %s %d %s %s\n", label, round, rps, p50, p90, p99, non2xx, (errs == "" ? "none" : errs), total, pc, rc
        }' "$out" >>"$WORK/wrk.txt"
    tail -n 1 "$WORK/wrk.txt" | awk '{ printf "  wrk %-22s round %s %8.0f req/s  p50 %.3f ms  p99 %.3f ms  (%d requests, non-2xx %d, socket errors %s; proxy CPU %s us/req, replica CPU %s us/req)\n", $1, $2, $3, $4, $6, $9, $7, $8, $10, $11 }'
}
# agg LABEL FIELD: the median over the rounds of one field (3 rps, 4 p50, 5 p90, 6 p99, 10/11
# CPU; the mean of the two middle values for an even count). The median, not the mean: one run
# hit by a burst of the other work on the machine should not move the result.
agg() {
    awk -v l="$1" -v f="$2" '$1 == l && $2 != 99 && $f != "-" { v[n++] = $f }
        END {
            if (!n) { printf "nan"; exit }
            for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
            printf "%.3f", (n % 2) ? v[int(n / 2)] : (v[n / 2 - 1] + v[n / 2]) / 2
        }' "$WORK/wrk.txt"
}
# span LABEL FIELD FORMAT: "min-max" over the rounds.
span() {
    awk -v l="$1" -v f="$2" -v fmt="$3" '$1 == l && $f != "-" { if (n == 0 || $f < lo) lo = $f; if (n == 0 || $f > hi) hi = $f; n++ }
        END { if (n) printf fmt "-" fmt, lo, hi; else printf "-" }' "$WORK/wrk.txt"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
check_body() {  # URL [HEADER]
    local body
    if [ -n "${2:-}" ]; then body=$(curl -s --max-time 5 -H "$2" "$1" || true); else body=$(curl -s --max-time 5 "$1" || true); fi
    [ "$body" = "$TOKEN" ] || die "$1 answered '${body:0:200}' instead of the token"
}
status_of() {  # URL [HEADER]: the HTTP status
    if [ -n "${2:-}" ]; then curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "$2" "$1" || true
    else curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" || true; fi
}
reuse() {  # URL [HEADER]: whether curl could send a second request on the connection of the first
    local out hdr=()
    [ -n "${2:-}" ] && hdr=(-H "$2")
    out=$(curl -sv --max-time 5 "${hdr[@]}" -o /dev/null -o /dev/null "$1" "$1" 2>&1 || true)
    if grep -q 'Re-using existing connection' <<<"$out"; then echo "kept open"; else echo "NOT kept open"; fi
}
# wait_service NAME: until `svc ps` says running and healthy; prints "port container_id".
wait_service() {
    local i js
    for i in $(seq 1 $((TIMEOUT * 10))); do
        js=$(meshctl svc ps "$1" --json 2>/dev/null || true)
        if python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r and r[0]["state"]=="running" and r[0]["healthy"] else 1)' "$js" 2>/dev/null; then
            python3 -c 'import json,sys; r=json.loads(sys.argv[1])[0]; print(r["port"], r["container_id"])' "$js"
            return 0
        fi
        sleep 0.1
    done
    die "service $1 not running after $TIMEOUT s: $(meshctl svc ps "$1" 2>&1)"
}
start_meshd() {  # RUST_LOG value
    echo "=== $(date -u +%H:%M:%S.%N) start, RUST_LOG=$1" >>"$WORK/meshd.log"
    RUST_LOG=$1 "$MESHD" --data-dir "$WORK/data" \
        --secret-file "$WORK/secret" --p2p "127.0.0.1:$PG" --grpc "127.0.0.1:$GG" \
        --http "127.0.0.1:$HG" --name n0 --no-mdns --containerd-namespace "$NS" >>"$WORK/meshd.log" 2>&1 &
    PID[meshd]=$!
    track $!
    local i ready=0 nodes
    # (meshctl output is captured before grep.)
    for i in $(seq 1 $((TIMEOUT * 10))); do
        if curl -sf --max-time 1 -o /dev/null "http://127.0.0.1:$HG/healthz"; then
            nodes=$(meshctl nodes --json 2>/dev/null || true)
            if grep -q '"meshwork.containers": *"ready"' <<<"$nodes"; then ready=1; break; fi
        fi
        sleep 0.1
    done
    [ "$ready" = 1 ] || die "meshd not healthy or containerd not ready after $TIMEOUT s: $(meshctl nodes 2>&1)"
}

# ================================================================ set-up
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "bench/gateway $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $(nproc) cores, load average $LOAD_START at start"
log "meshd: $MESHD_BUILT, sha256 $MESHD_SHA; containerd namespace $NS; work dir $WORK"
OTHER_MESHD=$(pgrep -x meshd | wc -l || true)
log "other meshd processes running: $OTHER_MESHD; other containerd namespaces: $(ctr namespaces ls -q | grep -vcx "$NS" || true)"

log "building the keep-alive upstream (static hyper server, cargo --offline, under the work dir)"
mkdir -p "$WORK/ka-server/src"
cat >"$WORK/ka-server/Cargo.toml" <<'EOF'
[package]
name = "ka-server"
version = "0.1.0"
edition = "2021"

[dependencies]
hyper = { version = "1", features = ["server", "http1"] }
hyper-util = { version = "0.1", features = ["tokio"] }
http-body-util = "0.1"
tokio = { version = "1", features = ["rt-multi-thread", "net", "macros"] }

[profile.release]
codegen-units = 4
EOF
cat >"$WORK/ka-server/src/main.rs" <<'EOF'
// Keep-alive upstream for bench/gateway (the same as bench/container part (c)): answers every
// request with the bytes of /www/index.html on 0.0.0.0:$PORT, HTTP/1.1 with keep-alive.
use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main(worker_threads = 2)]
async fn main() {
    let port = std::env::var("PORT").expect("PORT");
    let body = Bytes::from(std::fs::read("/www/index.html").expect("/www/index.html"));
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/html")
                            .body(Full::new(body))
                            .unwrap(),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
EOF
t=$(now)
if ! (cd "$WORK/ka-server" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$WORK/ka-server/target" \
    timeout 600 cargo build --release --offline -q --target x86_64-unknown-linux-gnu) >"$WORK/ka-build.log" 2>&1; then
    cat "$WORK/ka-build.log" >&2
    die "cannot build the keep-alive server offline"
fi
KA_BIN=$WORK/ka-server/target/x86_64-unknown-linux-gnu/release/ka-server
log "  built in $(awk -v m="$(ms_since "$t")" 'BEGIN { printf "%.0f", m / 1000 }') s ($(stat -c %s "$KA_BIN") bytes, static)"
python3 "$ROOT/bench/container/make-image.py" "$WORK/up.tar" --body "$TOKEN" --file "bin/ka-server=$KA_BIN" --cmd /bin/ka-server >/dev/null

"$MESHCTL" secret new >"$WORK/secret"
NS_MADE=1   # meshd creates it; remove it on exit from here on
start_meshd "$RUST_LOG_QUIET"
log "meshd up (RUST_LOG=$RUST_LOG_QUIET), containerd connected"
meshctl image push "$WORK/up.tar" --tag up:1 >"$WORK/push.txt" 2>&1 || die "push failed: $(cat "$WORK/push.txt")"
meshctl image import up:1 >"$WORK/import.txt" 2>&1 || die "import failed: $(cat "$WORK/import.txt")"
meshctl svc create up --image up:1 --replicas 1 --cpu "$UP_CPU" --memory "$UP_MEMORY" --port 8080 >/dev/null
read -r RPORT RCID <<<"$(wait_service up)"
find_cgroup "$RCID"
log "service up: one replica on port $RPORT (container $RCID; cgroup CPU counter: ${CG_USAGE:-not found})"
meshctl plan create bench --rate 1000000/s --burst 1000000 --quota 1000000000/day >/dev/null
KEY=$(meshctl key create --name bench --plan bench | tr -d '[:space:]')
[ -n "$KEY" ] || die "key create printed nothing"
meshctl key create --name other >/dev/null   # a second key, so the lookup is not trivially a single entry
meshctl route add /open --service up >/dev/null
meshctl route add /keyed --service up --auth key --plan bench >/dev/null
log "plan bench (--rate 1000000/s --burst 1000000 --quota 1000000000/day), key bench; routes /open (no auth) and /keyed (--auth key --plan bench)"

mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    upstream up { server 127.0.0.1:$RPORT; keepalive 32; }
    map_hash_bucket_size 256;
    map \$http_x_api_key \$key_ok { "$KEY" 1; default 0; }
    limit_req_zone \$http_x_api_key zone=perkey:1m rate=1000000r/s;
    limit_req_status 429;
    server {
        listen 127.0.0.1:$NGX;
        location /open/ { proxy_pass http://up/; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
    server {
        listen 127.0.0.1:$NGX_KEYED;
        location /keyed/ {
            if (\$key_ok = 0) { return 401; }
            limit_req zone=perkey burst=1000000 nodelay;
            proxy_pass http://up/; proxy_http_version 1.1; proxy_set_header Connection "";
        }
    }
}
EOF
"$NGINX" -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
PID[nginx]=$!
track $!
for i in $(seq 1 300); do curl -sf --max-time 1 -o /dev/null "http://127.0.0.1:$NGX/open/index.html" && break; sleep 0.01; done
alive "${PID[nginx]}" || die "nginx did not start: $(tail -n 5 "$WORK/nginx/error.log" "$WORK/nginx.log" 2>/dev/null)"
mapfile -t NP < <(echo "${PID[nginx]}"; pgrep -P "${PID[nginx]}" || true)   # master and worker

U_DIRECT="http://127.0.0.1:$RPORT/index.html"
U_NGX="http://127.0.0.1:$NGX/open/index.html"
U_GW="http://127.0.0.1:$HG/open/index.html"
U_NGXK="http://127.0.0.1:$NGX_KEYED/keyed/index.html"
U_GWK="http://127.0.0.1:$HG/keyed/index.html"
H="x-api-key: $KEY"
for i in $(seq 1 100); do [ "$(status_of "$U_GWK" "$H")" = 200 ] && break; sleep 0.1; done
check_body "$U_DIRECT"; check_body "$U_NGX"; check_body "$U_GW"
check_body "$U_NGXK" "$H"; check_body "$U_GWK" "$H"
CHECKS="without a key: gateway $(status_of "$U_GWK"), nginx $(status_of "$U_NGXK"); wrong key: gateway $(status_of "$U_GWK" "x-api-key: nope"), nginx $(status_of "$U_NGXK" "x-api-key: nope")"
log "  all five paths answer with the token; $CHECKS"
[ "$(status_of "$U_GWK")" = 401 ] || die "the gateway lets /keyed through without a key"
REUSE="gateway $(reuse "$U_GW"), gateway keyed $(reuse "$U_GWK" "$H"), nginx $(reuse "$U_NGX"), replica $(reuse "$U_DIRECT")"
log "  client connection reuse: $REUSE"

# ================================================================ the runs
ORDER=(direct nginx gateway nginx-keyed gateway-keyed)
[ "$PACED" = 1 ] && ORDER+=(direct-paced nginx-paced gateway-paced nginx-keyed-paced gateway-keyed-paced)
cat >"$WORK/paced.lua" <<EOF
-- bench/gateway paced runs: each connection waits $PACED_DELAY_MS ms before each request
function delay() return $PACED_DELAY_MS end
EOF
P="$WORK/paced.lua"
measure() {  # LABEL ROUND
    case "$1" in
        direct-paced) run_wrk direct-paced "$2" "$U_DIRECT" -S "$P" -- ;;
        nginx-paced) run_wrk nginx-paced "$2" "$U_NGX" -S "$P" -- "${NP[@]}" ;;
        gateway-paced) run_wrk gateway-paced "$2" "$U_GW" -S "$P" -- "${PID[meshd]}" ;;
        nginx-keyed-paced) run_wrk nginx-keyed-paced "$2" "$U_NGXK" -H "$H" -S "$P" -- "${NP[@]}" ;;
        gateway-keyed-paced) run_wrk gateway-keyed-paced "$2" "$U_GWK" -H "$H" -S "$P" -- "${PID[meshd]}" ;;
        direct) run_wrk direct "$2" "$U_DIRECT" -- ;;
        nginx) run_wrk nginx "$2" "$U_NGX" -- "${NP[@]}" ;;
        gateway) run_wrk gateway "$2" "$U_GW" -- "${PID[meshd]}" ;;
        nginx-keyed) run_wrk nginx-keyed "$2" "$U_NGXK" -H "$H" -- "${NP[@]}" ;;
        gateway-keyed) run_wrk gateway-keyed "$2" "$U_GWK" -H "$H" -- "${PID[meshd]}" ;;
        gateway-log) run_wrk gateway-log "$2" "$U_GW" -- "${PID[meshd]}" ;;
        gateway-keyed-log) run_wrk gateway-keyed-log "$2" "$U_GWK" -H "$H" -- "${PID[meshd]}" ;;
    esac
}
log "wrk -t$WRK_THREADS -c$WRK_CONNECTIONS -d$WRK_DURATION --latency, each after a $WRK_WARMUP warm-up; $ROUNDS rounds, order reversed every other round; meshd access log off"
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then seq_=("${ORDER[@]}"); else seq_=(); for ((i = ${#ORDER[@]} - 1; i >= 0; i--)); do seq_+=("${ORDER[$i]}"); done; fi
    for l in "${seq_[@]}"; do measure "$l" "$r"; done
done
STATS_QUIET=$(meshctl gateway stats 2>&1 || true)

if [ "$ACCESS_LOG" = 1 ]; then
    log "restarting meshd with the access log on (RUST_LOG=$RUST_LOG_ACCESS); the replica is adopted"
    stop_pid "${PID[meshd]}" meshd; unset 'PID[meshd]'
    lines0=$(wc -l <"$WORK/meshd.log")
    start_meshd "$RUST_LOG_ACCESS"
    read -r RPORT2 RCID2 <<<"$(wait_service up)"
    [ "$RPORT2" = "$RPORT" ] || die "the replica moved from port $RPORT to $RPORT2 across the restart"
    [ "$RCID2" = "$RCID" ] || log "  note: the replica's container changed ($RCID -> $RCID2)"
    find_cgroup "$RCID2"
    for i in $(seq 1 100); do [ "$(status_of "$U_GWK" "$H")" = 200 ] && break; sleep 0.1; done
    check_body "$U_GW"; check_body "$U_GWK" "$H"
    measure gateway-log 1
    measure gateway-keyed-log 1
    measure nginx 99   # nginx once more right after, same load (not part of the means above)
    ACCESS_LINES=$(tail -n +"$lines0" "$WORK/meshd.log" | grep -c 'meshwork_node::gateway::access' || true)
    ACCESS_BYTES=$(tail -n +"$lines0" "$WORK/meshd.log" | grep 'meshwork_node::gateway::access' | wc -c || true)
    SAMPLE_LINE=$(tail -n +"$lines0" "$WORK/meshd.log" | grep -m 1 'meshwork_node::gateway::access' || true)
fi

stop_pid "${PID[nginx]}" nginx; unset 'PID[nginx]'
log "stopping meshd"
stop_pid "${PID[meshd]}" meshd; unset 'PID[meshd]'
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ================================================================ summary
echo
echo "==================== bench/gateway summary ===================="
echo "one meshd on 127.0.0.1; upstream: one replica of service up (static hyper server, keep-alive, --cpu $UP_CPU) on port $RPORT; nginx $($NGINX -v 2>&1 | sed 's/.*nginx\///') worker_processes 1, upstream keepalive 32"
echo "wrk -t$WRK_THREADS -c$WRK_CONNECTIONS -d$WRK_DURATION --latency, each after a $WRK_WARMUP warm-up; $ROUNDS rounds (median of the rounds; req/s min-max in brackets); meshd access log off unless marked 'log'"
printf '    %-20s %18s %9s %9s %9s %16s %18s\n' "" "req/s" "p50 ms" "p90 ms" "p99 ms" "proxy CPU us/req" "replica CPU us/req"
for l in direct nginx gateway nginx-keyed gateway-keyed; do
    printf '    %-20s %7.0f %-10s %9.3f %9.3f %9.3f %16s %18s\n' "$l" "$(agg $l 3)" "($(span $l 3 %.0f))" "$(agg $l 4)" "$(agg $l 5)" "$(agg $l 6)" "$(agg $l 10 | sed 's/nan/-/')" "$(agg $l 11)"
done
if [ "$ACCESS_LOG" = 1 ]; then
    for l in gateway-log gateway-keyed-log; do
        printf '    %-20s %7.0f %-10s %9.3f %9.3f %9.3f %16s %18s\n' "$l" "$(agg $l 3)" "" "$(agg $l 4)" "$(agg $l 5)" "$(agg $l 6)" "$(agg $l 10)" "$(agg $l 11)"
    done
    printf '    %-20s %7.0f %-10s %9.3f %9.3f %9.3f %16s %18s\n' "nginx (after)" "$(awk '$1 == "nginx" && $2 == 99 { print $3 }' "$WORK/wrk.txt")" "" \
        "$(awk '$1 == "nginx" && $2 == 99 { print $4 }' "$WORK/wrk.txt")" "$(awk '$1 == "nginx" && $2 == 99 { print $5 }' "$WORK/wrk.txt")" \
        "$(awk '$1 == "nginx" && $2 == 99 { print $6 }' "$WORK/wrk.txt")" "$(awk '$1 == "nginx" && $2 == 99 { print $10 }' "$WORK/wrk.txt")" "$(awk '$1 == "nginx" && $2 == 99 { print $11 }' "$WORK/wrk.txt")"
fi
if [ "$PACED" = 1 ]; then
    echo "  paced: the same wrk command with a script that makes each of the $WRK_CONNECTIONS connections wait $PACED_DELAY_MS ms before each request"
    echo "  (at most $((WRK_CONNECTIONS * 1000 / PACED_DELAY_MS)) req/s offered, well below every path's capacity): latency at equal load, not at saturation"
    for l in direct-paced nginx-paced gateway-paced nginx-keyed-paced gateway-keyed-paced; do
        printf '    %-20s %7.0f %-10s %9.3f %9.3f %9.3f %16s %18s\n' "$l" "$(agg $l 3)" "" "$(agg $l 4)" "$(agg $l 5)" "$(agg $l 6)" "$(agg $l 10 | sed 's/nan/-/')" "$(agg $l 11)"
    done
fi
echo "    non-2xx / socket errors per run: $(awk '{ printf "%s#%s %s/%s  ", $1, ($2 == 99 ? "after" : $2), $7, $8 }' "$WORK/wrk.txt")"
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
# pair_summary G N DIRECT: per round (each round runs G, N and DIRECT within a minute of each
# other), the ratio of req/s G/N and the ratio of the p99s G and N add to that round's DIRECT
# p99; the headline is the median over the rounds (a round where either p99 is not above
# DIRECT's measured the machine's noise, not the proxies: it has no p99 ratio).
pair_summary() {
    awk -v g="$1" -v n="$2" -v dl="$3" '
        function med(a, k,   i, j, t) {
            for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
        }
        $2 != 99 && $1 == dl { d[$2] = $6 }
        $2 != 99 && $1 == g { gr[$2] = $3; gp[$2] = $6; g5[$2] = $4 }
        $2 != 99 && $1 == n { nr[$2] = $3; np[$2] = $6; n5[$2] = $4 }
        END {
            kr = 0; kp = 0; k5 = 0; rounds = ""
            for (r = 1; r in gr; r++) {
                if (!(r in nr) || !(r in d)) continue
                rr[++kr] = gr[r] / nr[r]
                q5[++k5] = g5[r] / n5[r]
                if (np[r] > d[r] && gp[r] > d[r]) { pr[++kp] = (gp[r] - d[r]) / (np[r] - d[r]); ps = sprintf("%.2f", pr[kp]) } else ps = "n/a"
                rounds = rounds sprintf("  #%d: %.0f/%.0f req/s = %.2f; p99 %.2f/%.2f ms, direct %.2f, added ratio %s", r, gr[r], nr[r], gr[r] / nr[r], gp[r], np[r], d[r], ps)
            }
            if (kr == 0) { print "    " g " / " n ": no complete round"; exit }
            mr = med(rr, kr); m5 = med(q5, k5)
            if (g !~ /paced/)
                printf "    %s / %s: req/s ratio %.2f (median of the %d rounds; goal >= 0.9: %s); p50 ratio %.2f\n", g, n, mr, kr, (mr >= 0.9 ? "met" : "NOT met"), m5
            if (kp > 0) { mp = med(pr, kp); printf "    %s / %s: p99 added to the same round'"'"'s direct p99, ratio %.2f (median of the %d of %d rounds where both p99s are above the direct one; goal <= 1.2: %s)%s\n", g, n, mp, kp, kr, (mp <= 1.2 ? "met" : "NOT met"), (g ~ /paced/ ? sprintf("; p50 ratio %.2f", m5) : "") }
            else printf "    %s / %s: p99 added: not measurable (in no round were both p99s above the direct p99: the direct run was the noisiest)\n", g, n
            print "        per round:" rounds
        }' "$WORK/wrk.txt"
}
for pair in "gateway nginx" "gateway-keyed nginx-keyed" "gateway-keyed nginx"; do
    pair_summary $pair direct
done
if [ "$PACED" = 1 ]; then
    echo "    at equal load (paced):"
    pair_summary gateway-paced nginx-paced direct-paced
    pair_summary gateway-keyed-paced nginx-keyed-paced direct-paced
fi
echo "    cost of key checking + plan (gateway-keyed vs gateway): req/s x$(ratio "$(agg gateway-keyed 3)" "$(agg gateway 3)"), proxy CPU $(awk -v a="$(agg gateway-keyed 10)" -v b="$(agg gateway 10)" 'BEGIN { printf "%+.1f", a - b }') us/req; in nginx (map + limit_req): req/s x$(ratio "$(agg nginx-keyed 3)" "$(agg nginx 3)"), $(awk -v a="$(agg nginx-keyed 10)" -v b="$(agg nginx 10)" 'BEGIN { printf "%+.1f", a - b }') us/req"
echo "    proxy CPU per request gateway / nginx: $(ratio "$(agg gateway 10)" "$(agg nginx 10)") (open), $(ratio "$(agg gateway-keyed 10)" "$(agg nginx-keyed 10)") (keyed)"
if [ "$ACCESS_LOG" = 1 ]; then
    echo "    access log on (meshd restarted, one run each): gateway req/s x$(ratio "$(agg gateway-log 3)" "$(agg gateway 3)") of the run without it, proxy CPU $(awk -v a="$(agg gateway-log 10)" -v b="$(agg gateway 10)" 'BEGIN { printf "%+.1f", a - b }') us/req;" \
        "keyed x$(ratio "$(agg gateway-keyed-log 3)" "$(agg gateway-keyed 3)"); $ACCESS_LINES access lines, $(awk -v b="$ACCESS_BYTES" -v n="$ACCESS_LINES" 'BEGIN { if (n) printf "%.0f", b / n; else print 0 }') bytes each"
    echo "    gateway with the access log / nginx (after): req/s $(ratio "$(agg gateway-log 3)" "$(awk '$1 == "nginx" && $2 == 99 { print $3 }' "$WORK/wrk.txt")")"
    echo "    an access line: ${SAMPLE_LINE:0:300}"
fi
echo "    checks: $CHECKS; connection reuse: $REUSE"
echo "    meshctl gateway stats after the runs with the access log off:"
echo "$STATS_QUIET" | sed 's/^/      /'
echo "meshd WARN/ERROR log lines, by message:"
W=$(grep -E ' (WARN|ERROR) ' "$WORK/meshd.log" | sed -E 's/^[^ ]+ +//; s/ [a-z_.]+=.*$//' | sort | uniq -c | sort -rn | head -n 15 || true)
if [ -n "$W" ]; then echo "$W" | sed 's/^/   /'; else echo "   none"; fi
echo "machine: $(nproc) cores, shared (wrk, nginx or meshd, the replica and other engineers' work all on them); load average at start $LOAD_START, at end $LOAD_END; other meshd processes at start: $OTHER_MESHD"
echo "meshd build: $MESHD_BUILT, sha256 $MESHD_SHA, tree $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- node proto client 2>/dev/null || echo '+uncommitted changes')"
echo "wall time: $(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s"
