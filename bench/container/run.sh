#!/usr/bin/env bash
# bench/container/run.sh: container services, the two goals of the container issue, next to
# containerd's own `ctr` and Debian's nginx, in one run on this machine.
#
# One meshd (target/release, copied to the work dir first) on 127.0.0.1 with its own
# containerd namespace (mwbench-<pid>), and an OCI image built by make-image.py from Debian's
# /bin/busybox: bin/busybox, bin/sh, www/index.html holding a token unique to the run; its
# command is `/bin/sh -c 'exec /bin/busybox httpd -f -p "$PORT" -h /www'`. The image is pushed
# (`meshctl image push`) and imported into containerd (`meshctl image import`) once before
# anything is timed, so no sample includes the first pull or import.
#
#  (a) submit -> process running, ROUNDS (20) rounds, each with one sample of each, side by
#      side (order alternating per round; startup.py):
#      - meshwork: a random 0-1 s pause (so that submissions land at a random phase of meshd's
#        1 s scheduler and supervisor loops), then the time from `meshctl svc create NAME
#        --image web:1 --replicas 1 --cpu 100m --memory 32Mi --port 8080` (a fresh NAME per
#        round) until the replica's port answers GET /index.html with the token. The port is
#        found by watching /proc/net/tcp{,6} for new LISTEN sockets in the replica port range
#        20000-29999 every 2 ms and probing them (replicas share the node's network namespace)
#        and checked against `svc ps --json` afterwards. Also printed per round: when `svc ps`
#        first said "running" (polled every 20 ms after the port answered; meshd reports
#        running 0.5 s after the start at the earliest), and from meshd's log when the claim
#        was placed, when the (already done) import was checked, when the task was started.
#        Then `svc rm` and wait until containerd has no container of it.
#      - ctr: the time from `ctr -n NS run --rm --net-host --cpus 0.1 --memory-limit 32Mi
#        --env PORT=P meshwork.local/web:1 ID` (the same image, as meshd imported it, its own
#        command, the same CPU quota and memory limit) until port P answers the same GET,
#        probed every 2 ms; then `ctr task kill -s SIGKILL` and wait for `ctr run --rm` to end.
#      Prints p50 and p90 (nearest rank) of both and the ratio of the p50s (goal <= 1.3).
#  (b) proxy throughput: one replica of the same image (service `web`, --cpu $B_CPU so that its
#      CPU quota is not the limit), route /web -> web. `wrk -t1 -c16 -d10s --latency` (after a
#      2 s warm-up each) through meshd's gateway http://127.0.0.1:H/web/index.html, through
#      nginx (1 worker process, `proxy_pass` to an upstream with `keepalive 32`, HTTP/1.1),
#      once before and once after the gateway, through the same nginx with the client
#      connection closed after every response (`keepalive_timeout 0`: what the gateway did before it
#      dropped hop-by-hop headers, see README), and directly to the replica's port. busybox httpd answers every request with
#      `Connection: close`, so every path opens one connection to the replica per request.
#      Prints req/s, p50/p90/p99, the ratio gateway/nginx (goal >= 0.9), the p99 each proxy
#      adds to the direct p99, the CPU per request of the proxy (its processes) and of the
#      replica (its cgroup), and the host's TCP ListenDrops during each run (busybox httpd
#      listens with a backlog of 9; a dropped SYN is retried after 1 s, which is what the
#      p90/p99 of this part mostly show). Also whether each keeps the client connection open.
#  (c) the same with an upstream that keeps connections open: a tiny static hyper server
#      (built here with cargo --offline, statically linked) in a second image `web-ka:1`,
#      service webka, route /webka; nginx with and without upstream keepalive. This isolates
#      what the gateway's new connection per request costs.
#
# Run as root (containerd, cgroups; apt-installs wrk/nginx/curl if missing):
#   cd /work/main
#   cargo build --release -p meshwork-node -p meshwork-client --bins
#   bench/container/run.sh          # about 5-6 minutes
# Knobs (environment): ROUNDS=20 PARTS="a b c" WRK_DURATION=10s WRK_WARMUP=2s
#   WRK_CONNECTIONS=16 PORT_BASE=18700 (meshd p2p/gRPC/HTTP = BASE..BASE+2, nginx BASE+10..11
#   for (b), BASE+20..21 for (c)) A_CPU=100m A_CTR_CPUS=0.1 A_MEMORY=32Mi B_CPU=2 TIMEOUT=30
#   (bound of every wait, s) DEADLINE=900 (the whole run, s) PROBE_MS=2 MESHD=… MESHCTL=…
#   KEEP_WORK=1 (keep the work dir with the meshd log).
# Every process it starts is stopped by pid on exit (trap, also on failure and Ctrl-C); the
# containerd namespace it made is emptied and removed (tasks killed, containers, images,
# namespace, and its empty cgroup directories).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MESHD=${MESHD:-$ROOT/target/release/meshd}
MESHCTL=${MESHCTL:-$ROOT/target/release/meshctl}
ROUNDS=${ROUNDS:-20}
PARTS=${PARTS:-a b c}
WRK_DURATION=${WRK_DURATION:-10s}
WRK_WARMUP=${WRK_WARMUP:-2s}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-16}
PORT_BASE=${PORT_BASE:-18700}
A_CPU=${A_CPU:-100m}
A_CTR_CPUS=${A_CTR_CPUS:-0.1}
A_MEMORY=${A_MEMORY:-32Mi}
B_CPU=${B_CPU:-2}
TIMEOUT=${TIMEOUT:-30}
DEADLINE=${DEADLINE:-900}
PROBE_MS=${PROBE_MS:-2}
KEEP_WORK=${KEEP_WORK:-0}
PG=$PORT_BASE GG=$((PORT_BASE + 1)) HG=$((PORT_BASE + 2))
NGX_B=$((PORT_BASE + 10)) NGX_B_CLOSE=$((PORT_BASE + 11))
NGX_C=$((PORT_BASE + 20)) NGX_C_NOKA=$((PORT_BASE + 21))
NS=mwbench-$$
TOKEN="meshwork-bench-container-$$-$RANDOM$RANDOM"

T0=$(date +%s.%N)
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "bench/container: $*" >&2; exit 1; }
now() { date +%s.%N; }
ms_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

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
[ -r /bin/busybox ] || die "/bin/busybox missing (apt-get install busybox-static)"
if ! ctr --connect-timeout 2s version >/dev/null 2>&1; then
    log "containerd does not answer; starting it with scripts/start-containerd.sh"
    "$ROOT/scripts/start-containerd.sh"
fi
for p in $PG $GG $HG $NGX_B $NGX_B_CLOSE $NGX_C $NGX_C_NOKA; do
    if ss -Hltn "sport = :$p" | grep -q .; then die "port $p is in use (set PORT_BASE)"; fi
done
grep -qx "$NS" <<<"$(ctr namespaces ls -q)" && die "containerd namespace $NS exists already"

WORK=$(mktemp -d /tmp/meshwork-bench-container.XXXXXX)
declare -A PID=()      # name -> pid of every long-running process this script started
declare -A STARTED=()  # pid -> start time (/proc/PID/stat field 22): a reused pid is never ours
NS_MADE=0
WATCHDOG=""
proc_start() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $20 }'; }
track() { STARTED[$1]=$(proc_start "$1"); STARTED[$1]=${STARTED[$1]:-gone}; }
alive() {
    [ "$(proc_start "$1")" = "${STARTED[$1]:-}" ] && ! grep -q '^State:[[:space:]]*[ZX]' "/proc/$1/status" 2>/dev/null
}
# stop_pid PID NAME: SIGTERM, at most 10 s, then SIGKILL; reaps it.
stop_pid() {
    local pid=$1 name=${2:-$1} i
    alive "$pid" && { kill -TERM "$pid" 2>/dev/null || true; }
    for i in $(seq 1 1000); do alive "$pid" || break; sleep 0.01; done
    if alive "$pid"; then
        echo "bench/container: $name (pid $pid) still running 10 s after SIGTERM; SIGKILL" >&2
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
        echo "bench/container: could not remove containerd namespace $NS:" >&2
        ctr -n "$NS" containers ls >&2; ctr -n "$NS" snapshots ls >&2; ctr -n "$NS" content ls >&2
    fi
    find /sys/fs/cgroup -depth -type d \( -path "*/$NS" -o -path "*/$NS/*" \) -exec rmdir {} \; 2>/dev/null
}
cleanup() {
    local rc=$? name
    set +e
    trap - EXIT INT TERM
    if [ -n "$WATCHDOG" ]; then kill -TERM "$WATCHDOG" 2>/dev/null; wait "$WATCHDOG" 2>/dev/null; fi
    for name in startup nginx meshd; do
        [ -n "${PID[$name]:-}" ] && stop_pid "${PID[$name]}" "$name"
    done
    if [ "$rc" != 0 ] && [ -f "$WORK/meshd.log" ]; then
        echo "bench/container: failed (exit $rc); meshd WARN/ERROR lines and last lines:" >&2
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
    echo "bench/container: deadline of $DEADLINE s reached; stopping" >&2
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
# CPU time of a container's cgroup (cgroup v1 cpuacct or v2 cpu.stat), in µs; empty if not found.
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
# Host-wide TCP listen queue overflows (SYNs dropped because an accept queue was full).
listen_drops() { awk '/^TcpExt:/ { if (!h) { split($0, k); h = 1 } else { for (i = 2; i <= NF; i++) if (k[i] == "ListenDrops") print $i } }' /proc/net/netstat; }
# run_wrk LABEL URL PID...: wrk after a warm-up; appends "LABEL rps p50 p90 p99 non2xx errors
# requests proxy_cpu_us_per_req replica_cpu_us_per_req listen_drops" to $WORK/wrk.txt (CPU of
# PID... and of the replica's cgroup, and the host's ListenDrops, during the measured run).
run_wrk() {
    local label=$1 url=$2 out="$WORK/wrk-$1.txt" c0 c1 r0 r1 d0 d1
    shift 2
    timeout 60 wrk -t1 -c"$WRK_CONNECTIONS" -d"$WRK_WARMUP" "$url" >/dev/null 2>&1 || true
    c0=$(cpu_ticks "$@"); r0=$(cgroup_usage_us); d0=$(listen_drops)
    timeout 120 wrk -t1 -c"$WRK_CONNECTIONS" -d"$WRK_DURATION" --latency "$url" >"$out" 2>&1 ||
        die "wrk against $url failed: $(cat "$out")"
    c1=$(cpu_ticks "$@"); r1=$(cgroup_usage_us); d1=$(listen_drops)
    awk -v label="$label" -v cpu="$((c1 - c0))" -v np="$#" -v hz="$CLK_TCK" -v r0="$r0" -v r1="$r1" -v drops="$((d1 - d0))" '
        function ms(s) { if (s ~ /us$/) return s * 0.001; if (s ~ /ms$/) return s + 0; if (s ~ /m$/) return s * 60000; if (s ~ /s$/) return s * 1000; return s }
        $1 == "Requests/sec:" { rps = $2 }
        $1 == "50%" { p50 = ms($2) } $1 == "90%" { p90 = ms($2) } $1 == "99%" { p99 = ms($2) }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ { errs = $0; sub(/.*Socket errors: */, "", errs); gsub(/ /, "", errs) }
        / requests in / { total = $1 }
        END {
            pc = (np > 0 && total > 0) ? sprintf("%.0f", cpu / hz * 1e6 / total) : "-"
            rc = (r0 != "" && r1 != "" && total > 0) ? sprintf("%.0f", (r1 - r0) / total) : "-"
            printf "%s %s %.3f %.3f %.3f %d %s %d %s %s %d\n", label, rps, p50, p90, p99, non2xx, (errs == "" ? "none" : errs), total, pc, rc, drops
        }' "$out" >>"$WORK/wrk.txt"
    tail -n 1 "$WORK/wrk.txt" | awk '{ printf "  wrk %-30s %8.0f req/s  p50 %.3f ms  p99 %.3f ms  (%d requests, non-2xx %d, socket errors %s; proxy CPU %s us/req, replica CPU %s us/req; host ListenDrops +%d)\n", $1, $2, $3, $5, $8, $6, $7, $9, $10, $11 }'
}
wrk_field() { awk -v l="$1" -v f="$2" '$1 == l { print $f }' "$WORK/wrk.txt"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
# fetch URL: the body, which must be the token.
check_body() {
    local body
    body=$(curl -s --max-time 5 "$1" || true)
    [ "$body" = "$TOKEN" ] || die "$1 answered '${body:0:200}' instead of the token"
}
# reuse URL: whether curl could send a second request on the connection of the first.
reuse() {
    local out
    out=$(curl -sv --max-time 5 -o /dev/null -o /dev/null "$1" "$1" 2>&1 || true)
    if grep -q 'Re-using existing connection' <<<"$out"; then
        echo "kept open (2 requests, 1 connection)"
    else
        echo "closed after each response ($(curl -sI --max-time 5 "$1" | tr -d '\r' | grep -i '^connection:' || echo 'no Connection header'))"
    fi
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
start_nginx() {  # CONFIG_BODY (the http{} contents)
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
$1
}
EOF
    "$NGINX" -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
    PID[nginx]=$!
    track $!
}
stop_nginx() { stop_pid "${PID[nginx]}" nginx; unset 'PID[nginx]'; }
nginx_pids() { echo "${PID[nginx]}"; pgrep -P "${PID[nginx]}" || true; }   # master and worker, one a line

# ================================================================ set-up
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "bench/container $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $(nproc) cores, load average $LOAD_START at start"
log "meshd: $MESHD_BUILT, sha256 $MESHD_SHA; containerd $(ctr version 2>/dev/null | awk '/Server:/ { s = 1 } s && /Version:/ { print $2; exit }'); namespace $NS; work dir $WORK"
OTHER_MESHD=$(pgrep -x meshd | wc -l || true)
log "other meshd processes running: $OTHER_MESHD; other containerd namespaces: $(ctr namespaces ls -q | grep -vcx "$NS" || true)"

python3 "$HERE/make-image.py" "$WORK/web.tar" --body "$TOKEN" >/dev/null
"$MESHCTL" secret new >"$WORK/secret"
NS_MADE=1   # meshd creates it; remove it on exit from here on
RUST_LOG=info,libp2p_kad=error,libp2p_gossipsub=warn "$MESHD" --data-dir "$WORK/data" \
    --secret-file "$WORK/secret" --p2p "127.0.0.1:$PG" --grpc "127.0.0.1:$GG" \
    --http "127.0.0.1:$HG" --name n0 --no-mdns --containerd-namespace "$NS" >"$WORK/meshd.log" 2>&1 &
PID[meshd]=$!
track $!
# (meshctl output is captured before grep: `grep -q` closing the pipe early makes meshctl panic.)
ready=0
for i in $(seq 1 $((TIMEOUT * 10))); do
    if curl -sf --max-time 1 -o /dev/null "http://127.0.0.1:$HG/healthz"; then
        nodes=$(meshctl nodes --json 2>/dev/null || true)
        if grep -q '"meshwork.containers": *"ready"' <<<"$nodes"; then ready=1; break; fi
    fi
    sleep 0.1
done
[ "$ready" = 1 ] || die "meshd not healthy or containerd not ready after $TIMEOUT s: $(meshctl nodes 2>&1)"
log "meshd up, containerd connected"
meshctl image push "$WORK/web.tar" --tag web:1 >"$WORK/push.txt" 2>&1 || die "push failed: $(cat "$WORK/push.txt")"
t=$(now)
meshctl image import web:1 >"$WORK/import.txt" 2>&1 || die "import failed: $(cat "$WORK/import.txt")"
log "pushed and imported web:1 (import $(ms_since "$t") ms; not part of any sample): $(cat "$WORK/import.txt")"
CTR_IMAGE=meshwork.local/web:1
grep -qx "$CTR_IMAGE" <<<"$(ctr -n "$NS" images ls -q)" || die "$CTR_IMAGE not in containerd namespace $NS"

# ================================================================ (a)
if want a; then
    log "(a) submit -> port answers, $ROUNDS rounds; meshwork (svc create, --cpu $A_CPU --memory $A_MEMORY) and ctr run (--cpus $A_CTR_CPUS, same memory limit) alternating"
    python3 "$HERE/startup.py" --meshctl "$MESHCTL" --endpoint "http://127.0.0.1:$GG" \
        --namespace "$NS" --meshd-log "$WORK/meshd.log" --image web:1 --ctr-image "$CTR_IMAGE" \
        --token "$TOKEN" --rounds "$ROUNDS" --cpu "$A_CPU" --ctr-cpus "$A_CTR_CPUS" \
        --memory "$A_MEMORY" --memory-bytes "$(python3 -c "import sys; s=sys.argv[1]; u={'Ki':1<<10,'Mi':1<<20,'Gi':1<<30}; print(int(s[:-2])*u[s[-2:]] if s[-2:] in u else int(s))" "$A_MEMORY")" \
        --probe-ms "$PROBE_MS" --timeout "$TIMEOUT" --work "$WORK" --out "$WORK/a.json" &
    PID[startup]=$!
    track $!
    wait "${PID[startup]}" || die "part (a) failed"
    unset 'PID[startup]'
fi

# ================================================================ (b)
if want b; then
    log "(b) proxy throughput: one replica of web:1 (busybox httpd) with --cpu $B_CPU; route /web"
    meshctl svc create web --image web:1 --replicas 1 --cpu "$B_CPU" --memory "$A_MEMORY" --port 8080 >/dev/null
    meshctl route add /web --service web >/dev/null
    read -r RPORT RCID <<<"$(wait_service web)"
    find_cgroup "$RCID"
    log "  replica on port $RPORT (container $RCID; cgroup CPU counter: ${CG_USAGE:-not found})"
    start_nginx "
    upstream replica { server 127.0.0.1:$RPORT; keepalive 32; }
    server {
        listen 127.0.0.1:$NGX_B;
        location /web/ { proxy_pass http://replica/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
    }
    server {
        listen 127.0.0.1:$NGX_B_CLOSE;
        keepalive_timeout 0;
        location /web/ { proxy_pass http://replica/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
    }"
    for i in $(seq 1 300); do curl -sf --max-time 1 -o /dev/null "http://127.0.0.1:$NGX_B/web/index.html" && break; sleep 0.01; done
    for u in "http://127.0.0.1:$HG/web/index.html" "http://127.0.0.1:$NGX_B/web/index.html" \
        "http://127.0.0.1:$NGX_B_CLOSE/web/index.html" "http://127.0.0.1:$RPORT/index.html"; do
        check_body "$u"
    done
    mapfile -t NP < <(nginx_pids)
    B_REUSE_GW=$(reuse "http://127.0.0.1:$HG/web/index.html")
    B_REUSE_NGX=$(reuse "http://127.0.0.1:$NGX_B/web/index.html")
    B_REUSE_DIRECT=$(reuse "http://127.0.0.1:$RPORT/index.html")
    log "  client connection: gateway $B_REUSE_GW; nginx $B_REUSE_NGX; replica itself $B_REUSE_DIRECT"
    log "  wrk -t1 -c$WRK_CONNECTIONS -d$WRK_DURATION --latency, each after a $WRK_WARMUP warm-up"
    run_wrk b-nginx-before "http://127.0.0.1:$NGX_B/web/index.html" "${NP[@]}"
    run_wrk b-gateway "http://127.0.0.1:$HG/web/index.html" "${PID[meshd]}"
    run_wrk b-nginx-after "http://127.0.0.1:$NGX_B/web/index.html" "${NP[@]}"
    run_wrk b-nginx-client-close "http://127.0.0.1:$NGX_B_CLOSE/web/index.html" "${NP[@]}"
    run_wrk b-direct "http://127.0.0.1:$RPORT/index.html"
    stop_nginx
    meshctl route rm /web >/dev/null
    meshctl svc rm web >/dev/null
fi

# ================================================================ (c)
if want c; then
    log "(c) keep-alive upstream: building a static hyper server (cargo --offline, under the work dir)"
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
// Keep-alive upstream for bench/container part (c): answers every request with the bytes of
// /www/index.html on 0.0.0.0:$PORT, HTTP/1.1 with keep-alive (busybox httpd closes every
// connection).
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
    python3 "$HERE/make-image.py" "$WORK/web-ka.tar" --body "$TOKEN" --file "bin/ka-server=$KA_BIN" --cmd /bin/ka-server >/dev/null
    meshctl image push "$WORK/web-ka.tar" --tag web-ka:1 >/dev/null
    meshctl image import web-ka:1 >/dev/null
    meshctl svc create webka --image web-ka:1 --replicas 1 --cpu "$B_CPU" --memory "$A_MEMORY" --port 8080 >/dev/null
    meshctl route add /webka --service webka >/dev/null
    read -r KPORT KCID <<<"$(wait_service webka)"
    find_cgroup "$KCID"
    log "  replica on port $KPORT (container $KCID)"
    start_nginx "
    upstream ka { server 127.0.0.1:$KPORT; keepalive 32; }
    upstream noka { server 127.0.0.1:$KPORT; }
    server {
        listen 127.0.0.1:$NGX_C;
        location /webka/ { proxy_pass http://ka/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
    }
    server {
        listen 127.0.0.1:$NGX_C_NOKA;
        location /webka/ { proxy_pass http://noka/; }
    }"
    for i in $(seq 1 300); do curl -sf --max-time 1 -o /dev/null "http://127.0.0.1:$NGX_C/webka/index.html" && break; sleep 0.01; done
    for u in "http://127.0.0.1:$HG/webka/index.html" "http://127.0.0.1:$NGX_C/webka/index.html" \
        "http://127.0.0.1:$NGX_C_NOKA/webka/index.html" "http://127.0.0.1:$KPORT/index.html"; do
        check_body "$u"
    done
    mapfile -t NP < <(nginx_pids)
    C_REUSE_GW=$(reuse "http://127.0.0.1:$HG/webka/index.html")
    C_REUSE_DIRECT=$(reuse "http://127.0.0.1:$KPORT/index.html")
    log "  client connection: gateway $C_REUSE_GW; replica itself $C_REUSE_DIRECT"
    run_wrk c-nginx-ka-before "http://127.0.0.1:$NGX_C/webka/index.html" "${NP[@]}"
    run_wrk c-gateway "http://127.0.0.1:$HG/webka/index.html" "${PID[meshd]}"
    run_wrk c-nginx-ka-after "http://127.0.0.1:$NGX_C/webka/index.html" "${NP[@]}"
    run_wrk c-nginx-no-upstream-ka "http://127.0.0.1:$NGX_C_NOKA/webka/index.html" "${NP[@]}"
    run_wrk c-direct "http://127.0.0.1:$KPORT/index.html"
    stop_nginx
    meshctl route rm /webka >/dev/null
    meshctl svc rm webka >/dev/null
fi

log "stopping meshd"
stop_pid "${PID[meshd]}" meshd; unset 'PID[meshd]'
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ================================================================ summary
echo
echo "==================== bench/container summary ===================="
echo "one meshd on 127.0.0.1, containerd $(ctr version 2>/dev/null | awk '/Server:/ { s = 1 } s && /Version:/ { print $2; exit }') namespace $NS; image web:1 = busybox httpd (OCI layout, $(stat -c %s "$WORK/web.tar") bytes), pushed and imported before any sample"
if want a; then
    python3 - "$WORK/a.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
def pct(v, p):
    v = sorted(v)
    if not v:
        return float("nan")
    i = max(1, -(-p * len(v) // 100))  # nearest rank
    return v[int(i) - 1]
mw = [x for x in s if x["kind"] == "meshwork"]
ct = [x for x in s if x["kind"] == "ctr"]
up_m = [x["up_ms"] for x in mw]
up_c = [x["up_ms"] for x in ct]
def line(label, v):
    print(f"    {label:<44} p50 {pct(v, 50):7.1f} ms   p90 {pct(v, 90):7.1f} ms   (min {min(v):7.1f}, max {max(v):7.1f}; n={len(v)})")
print(f"(a) submit -> process running (its HTTP port answers GET /index.html), {len(mw)} + {len(ct)} samples, alternating, same image, same CPU quota and memory limit")
line("meshwork: meshctl svc create -> port answers", up_m)
line("ctr run --rm --net-host -> port answers", up_c)
r = pct(up_m, 50) / pct(up_c, 50)
print(f"    ratio p50 meshwork / ctr: {r:.2f}   (goal <= 1.3: {'met' if r <= 1.3 else 'NOT met'});  p90 ratio {pct(up_m, 90) / pct(up_c, 90):.2f}")
print("    meshwork, where the time goes (p50 over rounds, ms after `svc create` was started; meshd log timestamps):")
def mark(k):
    return [x["log_ms"][k] for x in mw if k in x["log_ms"]]
cli = [x["create_cli_ms"] for x in mw]
print(f"      svc create returned {pct(cli, 50):7.1f}")
for k, what in (("placed", "claim placed (scheduler pass, every 1 s)"),
                ("imported", "image import checked (supervisor pass, every 1 s; already in containerd)"),
                ("started", "task started (container created + started)")):
    v = mark(k)
    if v:
        print(f"      {what:<75} p50 {pct(v, 50):7.1f}  (min {min(v):6.1f}, max {max(v):6.1f}; n={len(v)})")
gaps = [x["up_ms"] - x["log_ms"]["started"] for x in mw if "started" in x["log_ms"]]
if gaps:
    print(f"      task started -> port answers                                                p50 {pct(gaps, 50):7.1f}  (min {min(gaps):6.1f}, max {max(gaps):6.1f})")
st = [x["log_ms"]["started"] - x["log_ms"]["imported"] for x in mw if "started" in x["log_ms"] and "imported" in x["log_ms"]]
if st:
    print(f"      import checked -> task started (create + start through containerd)       p50 {pct(st, 50):7.1f}")
pl = mark("placed")
sv = [x["log_ms"]["imported"] - x["log_ms"]["placed"] for x in mw if "imported" in x["log_ms"] and "placed" in x["log_ms"]]
if sv:
    print(f"      placed -> supervisor picked it up (import checked)                        p50 {pct(sv, 50):7.1f}  (min {min(sv):6.1f}, max {max(sv):6.1f})")
pu = [x["up_ms"] - x["log_ms"]["placed"] for x in mw if "placed" in x["log_ms"]]
if pu:
    print(f"    meshwork without the wait for the scheduler pass: claim placed -> port answers p50 {pct(pu, 50):.1f} ms, p90 {pct(pu, 90):.1f} ms"
          f" (min {min(pu):.1f}, max {max(pu):.1f}); / ctr p50 = {pct(pu, 50) / pct(up_c, 50):.2f}")
psr = [x["ps_running_ms"] for x in mw if x["ps_running_ms"] is not None]
if psr:
    print(f"    meshwork, `svc ps` first says running (polled every 20 ms): p50 {pct(psr, 50):.0f} ms, p90 {pct(psr, 90):.0f} ms after create")
bad = [x["round"] for x in mw if x["ps_port"] != x["port"]]
print(f"    port found by probing = port in `svc ps --json`: {len(mw) - len(bad)} of {len(mw)}" + (f" (not in rounds {bad})" if bad else ""))
rm = [x["rm_gone_ms"] for x in mw]
kg = [x["kill_gone_ms"] for x in ct]
print(f"    clean-up (not part of the goal): svc rm -> container gone p50 {pct(rm, 50):.0f} ms (max {max(rm):.0f}; SIGTERM, 5 s grace, SIGKILL);"
      f" ctr task kill -s SIGKILL -> ctr run --rm done p50 {pct(kg, 50):.0f} ms")
EOF
fi
print_wrk() {  # PART LABEL...
    printf '    %-22s %9s %9s %9s %9s %15s %17s %12s\n' "" "req/s" "p50 ms" "p90 ms" "p99 ms" "proxy CPU us/req" "replica CPU us/req" "ListenDrops"
    local l
    for l in "$@"; do
        printf '    %-22s %9.0f %9.3f %9.3f %9.3f %15s %17s %12s\n' "${l#?-}" "$(wrk_field "$l" 2)" "$(wrk_field "$l" 3)" "$(wrk_field "$l" 4)" "$(wrk_field "$l" 5)" "$(wrk_field "$l" 9)" "$(wrk_field "$l" 10)" "+$(wrk_field "$l" 11)"
    done
    echo "    non-2xx / socket errors: $(for l in "$@"; do printf '%s %s/%s  ' "${l#?-}" "$(wrk_field "$l" 6)" "$(wrk_field "$l" 7)"; done)"
}
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f ms", a - b }'; }
if want b; then
    echo "(b) proxy throughput, wrk -t1 -c$WRK_CONNECTIONS -d$WRK_DURATION --latency to one replica of web:1 (busybox httpd: Connection: close on every response, one fork per connection)"
    print_wrk b-nginx-before b-gateway b-nginx-after b-nginx-client-close b-direct
    echo "    ratio req/s gateway / nginx: $(ratio "$(wrk_field b-gateway 2)" "$(wrk_field b-nginx-before 2)") (nginx before) / $(ratio "$(wrk_field b-gateway 2)" "$(wrk_field b-nginx-after 2)") (nginx after)   (goal >= 0.9)"
    echo "    ratio req/s gateway / nginx closing the client connection per request (what the gateway did before it dropped hop-by-hop headers): $(ratio "$(wrk_field b-gateway 2)" "$(wrk_field b-nginx-client-close 2)")"
    echo "    p99 added to the direct p99 ($(wrk_field b-direct 5) ms): gateway $(added "$(wrk_field b-gateway 5)" "$(wrk_field b-direct 5)"), nginx $(added "$(wrk_field b-nginx-before 5)" "$(wrk_field b-direct 5)") / $(added "$(wrk_field b-nginx-after 5)" "$(wrk_field b-direct 5)"), nginx closing client connections $(added "$(wrk_field b-nginx-client-close 5)" "$(wrk_field b-direct 5)")"
    echo "    client connection: gateway $B_REUSE_GW; nginx $B_REUSE_NGX"
    echo "    (busybox httpd listens with a backlog of 9: with 16 connections some handshakes overflow it (ListenDrops) and stall ~0.2-1 s;"
    echo "     wrk 4.1 corrects its latencies for coordinated omission, adding ~stall/interval synthetic samples per stall, so p90/p99 here show those stalls, not the proxy)"
fi
if want c; then
    echo "(c) the same with a keep-alive upstream (static hyper server in image web-ka:1)"
    print_wrk c-nginx-ka-before c-gateway c-nginx-ka-after c-nginx-no-upstream-ka c-direct
    echo "    ratio req/s gateway / nginx (upstream keepalive): $(ratio "$(wrk_field c-gateway 2)" "$(wrk_field c-nginx-ka-before 2)") (before) / $(ratio "$(wrk_field c-gateway 2)" "$(wrk_field c-nginx-ka-after 2)") (after)   (goal >= 0.9)"
    echo "    ratio req/s gateway / nginx with a new upstream connection per request (as the gateway): $(ratio "$(wrk_field c-gateway 2)" "$(wrk_field c-nginx-no-upstream-ka 2)")"
    echo "    cost of a new upstream connection per request, in nginx: req/s x$(ratio "$(wrk_field c-nginx-no-upstream-ka 2)" "$(wrk_field c-nginx-ka-before 2)"), p99 $(added "$(wrk_field c-nginx-no-upstream-ka 5)" "$(wrk_field c-nginx-ka-before 5)")"
    echo "    p99 added to the direct p99 ($(wrk_field c-direct 5) ms): gateway $(added "$(wrk_field c-gateway 5)" "$(wrk_field c-direct 5)"), nginx $(added "$(wrk_field c-nginx-ka-before 5)" "$(wrk_field c-direct 5)") / $(added "$(wrk_field c-nginx-ka-after 5)" "$(wrk_field c-direct 5)"), nginx without upstream keepalive $(added "$(wrk_field c-nginx-no-upstream-ka 5)" "$(wrk_field c-direct 5)")"
    echo "    client connection: gateway $C_REUSE_GW"
fi
echo "meshd WARN/ERROR log lines, by message:"
W=$(grep -E ' (WARN|ERROR) ' "$WORK/meshd.log" | sed -E 's/^[^ ]+ +//; s/ [a-z_.]+=.*$//' | sort | uniq -c | sort -rn | head -n 15 || true)
if [ -n "$W" ]; then echo "$W" | sed 's/^/   /'; else echo "   none"; fi
echo "machine: $(nproc) cores; load average at start $LOAD_START, at end $LOAD_END; other meshd processes at start: $OTHER_MESHD"
echo "meshd build: $MESHD_BUILT, sha256 $MESHD_SHA, tree $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- node proto client 2>/dev/null || echo '+uncommitted changes')"
echo "wall time: $(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s"
