#!/usr/bin/env bash
# deploy/local-cluster.sh: a local Meshwork cluster of N nodes, each in its own network namespace,
# all on one bridge, so that every node has its own address and the usual ports — like N small
# machines on a LAN. Needs root (ip netns, veth, bridge).
#
#   deploy/local-cluster.sh up [N]    start N nodes (default 3) and wait until all see N alive
#   deploy/local-cluster.sh status    processes, addresses, and the mesh as node 1 sees it
#   deploy/local-cluster.sh down      stop the nodes, delete the namespaces and the bridge
#   deploy/local-cluster.sh down --purge   ... and delete the logs and data dir too
#
# Layout: bridge mwlocal0 with 10.88.0.1/24 in the root namespace; namespace mwlocal-I (I = 1..N)
# holds eth0 = 10.88.0.(10+I)/24 (node 1 = 10.88.0.11) connected to the bridge by a veth pair
# (root side mwl-I). Node I runs
#   meshd --p2p 10.88.0.(10+I):7000 --grpc 10.88.0.(10+I):7100 --http 10.88.0.(10+I):8080 --no-mdns
# with --name nI, and nodes 2..N --join 10.88.0.11:7000. The namespaces have no default route:
# the nodes reach each other and the root namespace, nothing else.
# From the root namespace:  meshctl --endpoint http://10.88.0.11:7100 nodes
#
# Environment: DIR (logs, data dirs, secret, pids; default /tmp/meshwork-local),
#   MESHD / MESHCTL (default: target/release, else target/debug, of this checkout),
#   MESHD_EXTRA_ARGS (added to every meshd's command line, e.g. "--log-json").
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
DIR=${DIR:-/tmp/meshwork-local}
BRIDGE=mwlocal0
NS_PREFIX=mwlocal-
VETH_PREFIX=mwl-
NET=10.88.0
read -ra EXTRA <<<"${MESHD_EXTRA_ARGS:-}"

die() { printf 'local-cluster: %s\n' "$*" >&2; exit 1; }
say() { printf 'local-cluster: %s\n' "$*"; }

pick_bin() { # pick_bin NAME ENVVALUE
    if [[ -n $2 ]]; then echo "$2"; return; fi
    local b
    for b in "$ROOT/target/release/$1" "$ROOT/target/debug/$1"; do
        if [[ -x $b ]]; then echo "$b"; return; fi
    done
    command -v "$1" || die "no $1 binary: build with 'cargo build --release -p meshwork-node -p meshwork-client' or set ${1^^}"
}

need_root() { [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, veth, bridge)"; }
ip_of() { echo "$NET.$((10 + $1))"; }
our_namespaces() { ip netns list | awk '{print $1}' | grep "^${NS_PREFIX}[0-9]*$" || true; }

# A pid from a pid file is signalled only if it still runs our meshd with a data dir under DIR.
is_ours() {
    local c
    c=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $c == *meshd*"--data-dir $DIR/"* ]]
}

cmd_up() {
    need_root
    local n=${1:-3}
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1 || n > 200)); then die "N must be 1..200"; fi
    if ip link show "$BRIDGE" >/dev/null 2>&1 || [[ -n $(our_namespaces) ]]; then
        die "already up (bridge $BRIDGE or namespaces $NS_PREFIX* exist): '$0 down' first"
    fi
    local meshd meshctl
    meshd=$(pick_bin meshd "${MESHD:-}")
    meshctl=$(pick_bin meshctl "${MESHCTL:-}")
    mkdir -p "$DIR"
    if [[ ! -s $DIR/secret ]]; then
        (umask 077 && "$meshctl" secret new >"$DIR/secret")
    fi
    chmod 600 "$DIR/secret"

    # From here on a failure takes down what was built.
    trap 'say "up failed; cleaning up"; cmd_down >/dev/null 2>&1 || true' ERR

    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up

    local i ns addr
    for ((i = 1; i <= n; i++)); do
        ns=$NS_PREFIX$i
        addr=$(ip_of "$i")
        ip netns add "$ns"
        ip link add "$VETH_PREFIX$i" type veth peer name eth0 netns "$ns"
        ip link set "$VETH_PREFIX$i" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
    done

    for ((i = 1; i <= n; i++)); do
        ns=$NS_PREFIX$i
        addr=$(ip_of "$i")
        mkdir -p "$DIR/n$i"
        local join=()
        if ((i > 1)); then join=(--join "$(ip_of 1):7000"); fi
        ip netns exec "$ns" setsid "$meshd" --data-dir "$DIR/n$i/data" --secret-file "$DIR/secret" \
            --p2p "$addr:7000" --grpc "$addr:7100" --http "$addr:8080" \
            --name "n$i" --no-mdns "${join[@]}" "${EXTRA[@]}" \
            </dev/null >"$DIR/n$i/meshd.log" 2>&1 &
        echo $! >"$DIR/n$i/meshd.pid"
        disown $!
    done
    echo "$n" >"$DIR/nodes"
    trap - ERR

    say "started $n nodes; waiting (at most 60 s) until node 1 sees $n alive"
    local deadline=$((SECONDS + 60)) alive=0
    while ((SECONDS < deadline)); do
        alive=$("$meshctl" --endpoint "http://$(ip_of 1):7100" nodes --json 2>/dev/null |
            grep -c '"state": "alive"' || true)
        ((alive == n)) && break
        sleep 0.5
    done
    ((alive == n)) || say "WARNING: node 1 sees $alive of $n alive after 60 s; see $DIR/n*/meshd.log"
    cmd_status
    cat <<EOF

Reach the nodes from this (root) namespace, through the bridge:
  $meshctl --endpoint http://$(ip_of 1):7100 nodes
  curl http://$(ip_of 1):8080/metrics
  node I: gRPC http://$NET.(10+I):7100, HTTP http://$NET.(10+I):8080, p2p $NET.(10+I):7000
Inside a node's namespace:  ip netns exec ${NS_PREFIX}1 <command>
Logs: $DIR/nI/meshd.log   Stop:  $0 down
EOF
}

cmd_status() {
    local n i ns pid state
    n=$(cat "$DIR/nodes" 2>/dev/null || echo 0)
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        say "bridge $BRIDGE: $(ip -br addr show "$BRIDGE" | awk '{print $2, $3}')"
    else
        say "bridge $BRIDGE: absent"
    fi
    local nss
    nss=$(our_namespaces | tr '\n' ' ')
    say "namespaces: ${nss:-none}"
    for ((i = 1; i <= n; i++)); do
        ns=$NS_PREFIX$i
        pid=$(cat "$DIR/n$i/meshd.pid" 2>/dev/null || echo "")
        if [[ -n $pid ]] && is_ours "$pid"; then state="running (pid $pid)"; else state="not running"; fi
        say "  n$i  $ns  $(ip_of "$i")  meshd $state  log $DIR/n$i/meshd.log"
    done
    if ((n > 0)) && ip link show "$BRIDGE" >/dev/null 2>&1; then
        local meshctl
        meshctl=$(pick_bin meshctl "${MESHCTL:-}")
        echo
        "$meshctl" --endpoint "http://$(ip_of 1):7100" nodes || say "node 1 does not answer on $(ip_of 1):7100"
    fi
}

cmd_down() {
    need_root
    local purge=${1:-} i ns pid p deadline
    local pids=()
    # Our meshd processes: from the pid files, and anything still running inside our namespaces.
    for f in "$DIR"/n*/meshd.pid; do
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        if is_ours "$pid"; then pids+=("$pid"); fi
    done
    for ns in $(our_namespaces); do
        for p in $(ip netns pids "$ns" 2>/dev/null); do pids+=("$p"); done
    done
    if ((${#pids[@]})); then
        mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
        kill -TERM "${pids[@]}" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        for p in "${pids[@]}"; do
            while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        done
        for p in "${pids[@]}"; do if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi; done
        say "stopped ${#pids[@]} process(es)"
    fi
    rm -f "$DIR"/n*/meshd.pid
    for ns in $(our_namespaces); do
        ip netns delete "$ns" # takes its end of the veth pair, and so the root end, with it
    done
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep "^${VETH_PREFIX}[0-9]*$" || true); do
        ip link delete "$l" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
    if [[ $purge == --purge ]]; then
        rm -rf "$DIR"
        say "removed $DIR"
    else
        rm -f "$DIR/nodes"
        say "down; logs and data kept in $DIR ('$0 down --purge' removes them)"
    fi
}

case ${1:-} in
up) shift; cmd_up "$@" ;;
down) shift; cmd_down "$@" ;;
status) cmd_status ;;
*) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
