#!/usr/bin/python3
"""Measuring half of bench/gossip: waits for convergence and times propagation and failure
detection on a running meshd or serf mesh. bench/gossip starts and stops the processes; this
file only talks to them, over persistent connections so that polling costs well under a
millisecond per query:

- meshd: gRPC (python3-grpcio) with hand-encoded mesh.v1 messages, so no generated stubs are
  needed. State is read with StateService/Get, a member's verdict with ClusterService/GetNode
  (the same data `meshctl nodes --json` prints, for one member).
- serf: serf's own msgpack RPC (python3-msgpack), the protocol `serf members` and `serf tags`
  use, on one TCP connection per agent.

Every observer is polled by its own thread, so all observers are queried in parallel; each
loop is bounded by a deadline (--timeout) and sleeps --poll-ms between queries. A round's time
is when the LAST observer first answered with the new value/verdict, measured from just before
the change (the write, the tag change, the kill -9). It is an upper bound; the true time lies
within one poll interval plus one query round trip below it, and both are reported.

Usage (bench/gossip calls it; see there):
  gossip-probe.py meshd-wait  --ports HOST:PORT,... --expect N --timeout S
  gossip-probe.py meshd-propagate --ports HOST:PORT,... --rounds R --out FILE
  gossip-probe.py meshd-failure --ports HOST:PORT,... --names n0,... --pids PID,... --victims i,j,k --out FILE
  gossip-probe.py serf-wait / serf-propagate / serf-failure  (same flags, RPC ports)
  gossip-probe.py report --dir DIR
"""

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
import uuid

# ---------------------------------------------------------------- protobuf, by hand


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field, data):
    """A length-delimited field (string, bytes, sub-message)."""
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _fields(buf):
    """Yields (field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    n = len(buf)
    while i < n:
        key, i = _read_varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(buf, i)
        elif wt == 2:
            ln, i = _read_varint(buf, i)
            v = buf[i : i + ln]
            i += ln
        elif wt == 1:
            v = buf[i : i + 8]
            i += 8
        elif wt == 5:
            v = buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield field, v


def _read_varint(buf, i):
    shift = 0
    result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


ALIVE, SUSPECT, DEAD = 1, 2, 3  # mesh.v1.NodeState


class Meshd:
    """One meshd's gRPC API."""

    def __init__(self, addr):
        import grpc  # python3-grpcio

        self.grpc = grpc
        self.port = addr
        self.channel = grpc.insecure_channel(addr)
        self._put = self.channel.unary_unary("/mesh.v1.StateService/Put")
        self._get = self.channel.unary_unary("/mesh.v1.StateService/Get")
        self._list = self.channel.unary_unary("/mesh.v1.ClusterService/ListNodes")
        self._node = self.channel.unary_unary("/mesh.v1.ClusterService/GetNode")
        self._info = self.channel.unary_unary("/mesh.v1.ClusterService/GetInfo")
        # Channels connect lazily: connect now, so no measured query pays for the handshake.
        self._info(b"", timeout=5)

    def put(self, key, value):
        self._put(_ld(1, key.encode()) + _ld(2, value.encode()), timeout=5)

    def get(self, key):
        """The value at key on this replica, or None."""
        try:
            resp = self._get(_ld(1, key.encode()), timeout=5)
        except self.grpc.RpcError as e:
            if e.code() == self.grpc.StatusCode.NOT_FOUND:
                return None
            raise
        for f, v in _fields(resp):
            if f == 2:
                return bytes(v).decode()
        return ""

    def node_state(self, name):
        """The answering node's verdict on member `name` (mesh.v1.NodeState number)."""
        resp = self._node(_ld(1, name.encode()), timeout=5)
        for f, v in _fields(resp):
            if f == 4:
                return v
        return 0

    def states(self):
        """{name: state} of every member this node knows."""
        resp = self._list(b"", timeout=5)
        out = {}
        for f, v in _fields(resp):
            if f == 1:
                name, state = "", 0
                for nf, nv in _fields(v):
                    if nf == 1:
                        name = bytes(nv).decode()
                    elif nf == 4:
                        state = nv
                out[name] = state
        return out


class Serf:
    """One serf agent's msgpack RPC (the protocol of `serf members`, `serf tags`)."""

    def __init__(self, addr):
        import msgpack  # python3-msgpack

        self.msgpack = msgpack
        self.port = addr
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        self.seq = 0
        self._call("handshake", {"Version": 1}, body=False)

    def _recv(self):
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError(f"serf rpc {self.port} closed")
                self.unpacker.feed(data)

    def _call(self, command, req=None, body=True):
        self.seq += 1
        msg = self.msgpack.packb({"Command": command, "Seq": self.seq})
        if req is not None:
            msg += self.msgpack.packb(req)
        self.sock.sendall(msg)
        header = self._recv()
        if header.get("Error"):
            raise RuntimeError(f"serf {command}: {header['Error']}")
        return self._recv() if body else None

    def members(self, name_regex=""):
        req = {"Name": name_regex, "Tags": {}, "Status": ""}
        return self._call("members-filtered", req)["Members"]

    def set_tag(self, key, value):
        self._call("tags", {"Tags": {key: value}, "DeleteTags": []}, body=False)


# ---------------------------------------------------------------- polling


def poll_all(observers, check, t0_holder, start, timeout, poll_s):
    """Polls check(observer) on every observer, each in its own thread, until it returns
    True or the deadline passes. Returns ({index: seconds after t0 or None}, [query RTTs]).
    The threads are started first and released by `start` (an Event) right after the change,
    so polling begins at once; t0_holder[0] is the time of the change."""
    seen = {}
    rtts = []
    lock = threading.Lock()

    def worker(idx, obs):
        start.wait()
        t0 = t0_holder[0]
        deadline = t0 + timeout
        mine = []
        result = None
        prev_sent = t0  # nothing can be visible before the change
        while True:
            ts = time.perf_counter()
            try:
                ok = check(obs)
            except Exception:  # an observer that errors is retried until the deadline
                ok = False
            tr = time.perf_counter()
            mine.append(tr - ts)
            if ok:
                # Visible at the observer after it answered the previous (negative) query,
                # which it did after prev_sent, and before this answer arrived: (lo, hi].
                result = (prev_sent - t0, tr - t0)
                break
            prev_sent = ts
            if tr > deadline:
                break
            time.sleep(max(0.0, poll_s - (tr - ts)))
        with lock:
            seen[idx] = result
            rtts.extend(mine)

    threads = [threading.Thread(target=worker, args=(i, o), daemon=True) for i, o in observers]
    for t in threads:
        t.start()
    return threads, seen, rtts


def run_round(observers, check, change, timeout, poll_s):
    start = threading.Event()
    t0 = [0.0]
    threads, seen, rtts = poll_all(observers, check, t0, start, timeout, poll_s)
    time.sleep(0.05)  # let every thread reach start.wait()
    t0[0] = time.perf_counter()
    start.set()  # observers poll while the change is being made (serf's tags call blocks)
    change()
    for t in threads:
        t.join(timeout + 10)
    return seen, rtts


def summarize_round(seen):
    missing = [i for i, v in seen.items() if v is None]
    times = [v[1] for v in seen.values() if v is not None]
    lows = [v[0] for v in seen.values() if v is not None]
    slowest = max((i for i, v in seen.items() if v is not None), key=lambda i: seen[i][1], default=None)
    return {
        "slowest_observer": slowest,
        "all_seen_s": None if missing else max(times),
        "all_seen_lo_s": None if missing else max(lows),
        "first_seen_s": min(times) if times else None,
        "median_observer_s": statistics.median(times) if times else None,
        "missing": missing,
        "observers": len(seen),
    }


def wait_converged(clients, expect, timeout, count_alive, label):
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = None
    while time.monotonic() < deadline:
        counts = []
        for c in clients:
            try:
                counts.append(count_alive(c))
            except Exception:
                counts.append(-1)
        last = counts
        if all(n == expect for n in counts):
            took = time.monotonic() - t0
            print(f"{label}: all {len(clients)} see {expect} alive after {took:.1f} s of waiting")
            return True
        time.sleep(0.2)
    print(f"{label}: NOT converged after {timeout} s; alive counts per node: {last}", file=sys.stderr)
    return False


def connect(cls, ports, timeout=30):
    """Connects to every port, retrying until the deadline (the process may still be starting)."""
    out = []
    deadline = time.monotonic() + timeout
    for p in ports:
        while True:
            try:
                out.append(cls(p))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return out


def addrs(text):
    """HOST:PORT list; a bare PORT means 127.0.0.1:PORT."""
    return [a if ":" in a else f"127.0.0.1:{a}" for a in text.split(",") if a]


def pct(rtts, q):
    if not rtts:
        return None
    s = sorted(rtts)
    return s[min(len(s) - 1, int(q * len(s)))]


def fmt_s(v):
    return "timeout" if v is None else f"{v:.3f}s"


# ---------------------------------------------------------------- commands


def cmd_wait(args, cls):
    ports = addrs(args.ports)
    clients = connect(cls, ports, timeout=args.timeout)
    if cls is Meshd:
        count = lambda c: sum(1 for s in c.states().values() if s == ALIVE)
        label = "meshd"
    else:
        count = lambda c: sum(1 for m in c.members() if m["Status"] == "alive")
        label = "serf"
    # Give the node processes' own start-up some time out of the same budget.
    return 0 if wait_converged(clients, args.expect, args.timeout, count, label) else 1


def cmd_propagate(args, cls):
    ports = addrs(args.ports)
    clients = connect(cls, ports)
    n = len(clients)
    rounds = []
    rtts_all = []
    for r in range(args.rounds):
        writer = (3 + 4 * r) % n
        value = f"r{r}-{uuid.uuid4().hex[:12]}"
        observers = [(i, clients[i]) for i in range(n) if i != writer]
        if cls is Meshd:
            key = "bench/k"
            check = lambda c: c.get(key) == value
            change = lambda: clients[writer].put(key, value)
        else:
            wname = f"s{writer}"
            rx = f"^{wname}$"

            def check(c, rx=rx, value=value):
                ms = c.members(rx)
                return bool(ms) and ms[0]["Tags"].get("bench") == value

            change = lambda: clients[writer].set_tag("bench", value)
        seen, rtts = run_round(observers, check, change, args.timeout, args.poll_ms / 1000)
        rtts_all.extend(rtts)
        s = summarize_round(seen)
        s.update(writer=writer, queries=len(rtts))
        rounds.append(s)
        print(
            f"  (a) round {r + 1}: change on node {writer}, seen by all {s['observers']} others after "
            f"{fmt_s(s['all_seen_s'])} (> {fmt_s(s['all_seen_lo_s'])}; first {fmt_s(s['first_seen_s'])}, median observer "
            f"{fmt_s(s['median_observer_s'])}, slowest node {s['slowest_observer']}, {len(rtts)} queries)"
        )
        time.sleep(args.gap)
    done = [x["all_seen_s"] for x in rounds if x["all_seen_s"] is not None]
    result = {
        "rounds": rounds,
        "median_s": statistics.median(done) if len(done) == len(rounds) else None,
        "median_lo_s": statistics.median([x["all_seen_lo_s"] for x in rounds]) if len(done) == len(rounds) else None,
        "poll_ms": args.poll_ms,
        "query_rtt_median_ms": 1000 * pct(rtts_all, 0.5),
        "query_rtt_p99_ms": 1000 * pct(rtts_all, 0.99),
        "query_rtt_max_ms": 1000 * max(rtts_all),
    }
    json.dump(result, open(args.out, "w"), indent=1)
    return 0 if result["median_s"] is not None else 1


def cmd_failure(args, cls):
    ports = addrs(args.ports)
    names = args.names.split(",")
    pids = [int(p) for p in args.pids.split(",")]
    victims = [int(v) for v in args.victims.split(",")]
    clients = connect(cls, ports)
    dead_set = set()
    rounds = []
    rtts_all = []
    for r, v in enumerate(victims):
        vname = names[v]
        observers = [(i, clients[i]) for i in range(len(clients)) if i != v and i not in dead_set]
        suspect_seen = {}
        if cls is Meshd:

            def check(c, vname=vname, suspect_seen=suspect_seen):
                st = c.node_state(vname)
                if st >= SUSPECT and c.port not in suspect_seen:
                    suspect_seen[c.port] = time.perf_counter()
                return st == DEAD
        else:
            rx = f"^{vname}$"

            def check(c, rx=rx):
                ms = c.members(rx)
                return bool(ms) and ms[0]["Status"] == "failed"

        t0 = [0.0]

        killed_at = [0.0]

        def change(v=v):
            killed_at[0] = time.time()  # wall clock, to compare with the nodes' log stamps
            os.kill(pids[v], signal.SIGKILL)

        start = threading.Event()
        threads, seen, rtts = poll_all(observers, check, t0, start, args.timeout, args.poll_ms / 1000)
        time.sleep(0.05)
        t0[0] = time.perf_counter()
        start.set()
        change()
        for t in threads:
            t.join(args.timeout + 10)
        dead_set.add(v)
        rtts_all.extend(rtts)
        s = summarize_round(seen)
        s.update(victim=vname, queries=len(rtts), killed_at_unix=killed_at[0])
        if suspect_seen:
            s["suspect_all_s"] = (
                max(suspect_seen.values()) - t0[0] if len(suspect_seen) == len(observers) else None
            )
        rounds.append(s)
        extra = ""
        if "suspect_all_s" in s:
            extra = f"; all saw it suspect after {fmt_s(s['suspect_all_s'])}"
        print(
            f"  (b) round {r + 1}: kill -9 {vname}, all {s['observers']} survivors report it "
            f"{'dead' if cls is Meshd else 'failed'} after {fmt_s(s['all_seen_s'])} "
            f"(> {fmt_s(s['all_seen_lo_s'])}; first {fmt_s(s['first_seen_s'])}, slowest node {s['slowest_observer']}{extra})"
        )
        time.sleep(args.gap)
    done = [x["all_seen_s"] for x in rounds if x["all_seen_s"] is not None]
    result = {
        "rounds": rounds,
        "median_s": statistics.median(done) if len(done) == len(rounds) else None,
        "median_lo_s": statistics.median([x["all_seen_lo_s"] for x in rounds]) if len(done) == len(rounds) else None,
        "poll_ms": args.poll_ms,
        "query_rtt_median_ms": 1000 * pct(rtts_all, 0.5),
        "query_rtt_p99_ms": 1000 * pct(rtts_all, 0.99),
        "query_rtt_max_ms": 1000 * max(rtts_all),
    }
    json.dump(result, open(args.out, "w"), indent=1)
    return 0 if result["median_s"] is not None else 1


def cmd_report(args):
    d = args.dir

    def load(name):
        try:
            return json.load(open(os.path.join(d, name)))
        except FileNotFoundError:
            return None

    mp, sp = load("meshd-propagate.json"), load("serf-propagate.json")
    mf, sf = load("meshd-failure.json"), load("serf-failure.json")
    info = load("info.json") or {}

    def med(x):
        return None if not x else x["median_s"]

    def ratio(a, b):
        a, b = med(a), med(b)
        if a is None or b is None or b == 0:
            return "n/a"
        return f"{a / b:.2f}"

    def ms(x):
        return "n/a" if x is None else f"{x * 1000:.0f} ms"

    def mb(kb):
        return "n/a" if kb is None else f"{kb / 1024:.1f} MB"

    print("==================== bench/gossip summary ====================")
    print(f"nodes per mesh: {info.get('nodes')} on {info.get('loopback')}   polling: (a) every {args_poll(mp)}, (b) every {args_poll(mf)} per observer, all observers in parallel")
    print("(a) change on one node -> seen on all others (median of rounds)")
    others = (info.get("nodes") or 20) - 1
    print(f"    meshd (replicated-state write, `state put` then `state get` on the {others} others;")
    print("           node labels cannot change at run time yet, so this is the state propagation time)")
    print(f"    meshd: {ms(med(mp))}   rounds: {rounds_str(mp)}")
    pm = info.get("meshd_propagation_metric")
    if pm and pm.get("count"):
        print(f"           meshd's own mesh_state_propagation_seconds over all nodes (no polling): {pm['count']} applies, "
              f"mean {pm['mean_s'] * 1000:.1f} ms, all within {float(pm['all_below_s']) * 1000:.0f} ms (histogram bucket)")
    print(f"    serf  (`serf tags -set`, seen in `serf members` on the {others} others)")
    print(f"    serf : {ms(med(sp))}   rounds: {rounds_str(sp)}")
    print(f"    ratio meshd/serf: {ratio(mp, sp)}   (goal <= 1.0)")
    print("(b) kill -9 of one node -> all survivors report it dead (meshd) / failed (serf)")
    print(f"    meshd: {ms(med(mf))}   rounds: {rounds_str(mf)}")
    if mf:
        sus = [r.get("suspect_all_s") for r in mf["rounds"]]
        print(f"           (all survivors saw it suspect after: {', '.join(ms(s) for s in sus)})")
    print(f"    serf : {ms(med(sf))}   rounds: {rounds_str(sf)}")
    print(f"    ratio meshd/serf: {ratio(mf, sf)}   (goal <= 1.0)")
    try:
        fv = open(os.path.join(d, "meshd-false-verdicts.txt")).read().rstrip()
        print("meshd false suspect/dead verdicts about live nodes during the run (from the logs):")
        print(fv)
    except FileNotFoundError:
        pass
    print("times are upper bounds (last observer's first positive answer); the lower bound is its last negative query's send time")
    print("poll query round trip (median / p99), the resolution of the times above:")
    for label, x in (("meshd (a)", mp), ("serf (a)", sp), ("meshd (b)", mf), ("serf (b)", sf)):
        if x:
            print(f"    {label}: {x['query_rtt_median_ms']:.2f} / {x['query_rtt_p99_ms']:.2f} ms (max {x.get('query_rtt_max_ms', 0):.0f} ms), poll every {x['poll_ms']:.0f} ms")
    print("memory and size")
    m = info.get("meshd_rss_kb", {})
    s = info.get("serf_rss_kb", {})
    print(
        f"    idle RSS of one meshd (node {info.get('rss_node')}, {info.get('settle_s')} s after the mesh of "
        f"{info.get('nodes')} converged): {mb(m.get('one'))}   (goal <= 30 MB; all {info.get('nodes')}: "
        f"min {mb(m.get('min'))}, median {mb(m.get('median'))}, max {mb(m.get('max'))})"
    )
    print(
        f"    idle RSS of one serf agent (same node index, same wait): {mb(s.get('one'))}   (all: min "
        f"{mb(s.get('min'))}, median {mb(s.get('median'))}, max {mb(s.get('max'))})"
    )
    if "meshd_rss_after_kb" in info:
        print(f"    meshd RSS after the runs, median of survivors: {mb(info['meshd_rss_after_kb'])}")
    print(f"    idle CPU over the settle window, mean per process: meshd {info.get('meshd_cpu_pct', 'n/a')} % of a core, "
          f"serf {info.get('serf_cpu_pct', 'n/a')} % of a core")
    print(f"    meshd binary (target/release/meshd, stripped): {info.get('meshd_bytes', 0) / 1e6:.1f} MB "
          f"({info.get('meshd_bytes')} bytes); serf binary {info.get('serf_bytes', 0) / 1e6:.1f} MB for comparison")
    print(f"meshd build: {info.get('meshd_build')}; serf {info.get('serf_version')}")
    print(f"machine: {os.cpu_count()} cores; load average at start {info.get('loadavg_start')}, at end {info.get('loadavg_end')}; "
          f"other meshd/serf processes running at start: {info.get('other_processes_at_start')}")
    att = info.get("meshd_attempts") or 1
    note = "" if att == 1 else f" (on attempt {att}: {att - 1} fresh mesh(es) before it did not converge within {info.get('converge_timeout_s')} s)"
    print(f"    time to converge after start: meshd {info.get('meshd_converge')}{note}, serf {info.get('serf_converge')}")
    return 0


def args_poll(x):
    return f"{x['poll_ms']:.0f} ms" if x else "?"


def rounds_str(x):
    if not x:
        return "not run"
    per = ", ".join("timeout" if r["all_seen_s"] is None else f"{r['all_seen_s'] * 1000:.0f}" for r in x["rounds"])
    lo = "" if x.get("median_lo_s") is None else f"; median of lower bounds {x['median_lo_s'] * 1000:.0f} ms"
    return per + " ms" + lo


def cmd_rss(args):
    """RSS (kB) of pids: the one at --one and min/median/max; and CPU seconds used (for --cpu)."""
    pids = [int(p) for p in args.pids.split(",")]
    vals = []
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    vals.append(int(line.split()[1]))
    print(json.dumps({"one": vals[args.one], "min": min(vals), "median": statistics.median(vals), "max": max(vals), "all": vals}))
    return 0


def cmd_cpu(args):
    """Total user+system CPU seconds of pids."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in args.pids.split(","):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    print(f"{total / tck:.2f}")
    return 0


def cmd_logscan(args):
    """False verdicts in meshd's logs: `member suspect`/`member dead` about a node that was
    alive (never killed, or before its kill -9; kill times from --out, the failure JSON)."""
    import datetime
    import glob
    import re

    kills = {}
    try:
        for r in json.load(open(args.out))["rounds"]:
            kills[r["victim"]] = r["killed_at_unix"]
    except (FileNotFoundError, KeyError):
        pass
    pat = re.compile(r"^(\S+)\s+WARN .*member (suspect|dead) .*name=(\S+)")
    false = []
    for path in sorted(glob.glob(os.path.join(args.dir, "n*.log"))):
        observer = os.path.basename(path)[:-4]
        for line in open(path, errors="replace"):
            m = pat.match(line)
            if not m:
                continue
            stamp, verdict, name = m.groups()
            t = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            if name not in kills or t < kills[name]:
                false.append((stamp, observer, verdict, name))
    if not false:
        print("   none")
    else:
        by = {}
        for stamp, observer, verdict, name in false:
            by.setdefault((verdict, name), []).append((stamp, observer))
        for (verdict, name), seen in sorted(by.items()):
            obs = sorted({o for _, o in seen})
            print(f"   {name} {verdict} while alive: {len(seen)} verdict(s) by {len(obs)} node(s) ({', '.join(obs[:6])}"
                  f"{', ...' if len(obs) > 6 else ''}), first at {min(seen)[0]}")
    return 0


def cmd_propmetrics(args):
    """meshd's own mesh_state_propagation_seconds histogram (write stamp on the origin to apply by
    gossip here), summed over the nodes at --ports (HTTP): a cross-check of (a) without polling."""
    import urllib.request

    count = 0
    total = 0.0
    buckets = {}
    for p in args.ports.split(","):
        text = urllib.request.urlopen(f"http://{p}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("mesh_state_propagation_seconds_count"):
                count += int(float(line.split()[-1]))
            elif line.startswith("mesh_state_propagation_seconds_sum"):
                total += float(line.split()[-1])
            elif line.startswith("mesh_state_propagation_seconds_bucket"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[le] = buckets.get(le, 0) + int(float(line.split()[-1]))
    bound = None
    for le, n in sorted(buckets.items(), key=lambda kv: float(kv[0])):
        if n == count and count:
            bound = le
            break
    print(json.dumps({"count": count, "mean_s": total / count if count else None, "all_below_s": bound}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command")
    ap.add_argument("--ports", default="")
    ap.add_argument("--names", default="")
    ap.add_argument("--pids", default="")
    ap.add_argument("--victims", default="5,11,17")
    ap.add_argument("--expect", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--poll-ms", type=float, default=50.0)
    ap.add_argument("--gap", type=float, default=1.0, help="pause between rounds, seconds")
    ap.add_argument("--one", type=int, default=10)
    ap.add_argument("--out", default="/dev/null")
    ap.add_argument("--dir", default=".")
    args = ap.parse_args()
    c = args.command
    if c == "report":
        return cmd_report(args)
    if c == "rss":
        return cmd_rss(args)
    if c == "cpu":
        return cmd_cpu(args)
    if c == "logscan":
        return cmd_logscan(args)
    if c == "propmetrics":
        return cmd_propmetrics(args)
    system, _, what = c.partition("-")
    cls = {"meshd": Meshd, "serf": Serf}.get(system)
    fn = {"wait": cmd_wait, "propagate": cmd_propagate, "failure": cmd_failure}.get(what)
    if cls is None or fn is None:
        ap.error(f"unknown command {c}")
    return fn(args, cls)


if __name__ == "__main__":
    sys.exit(main())
