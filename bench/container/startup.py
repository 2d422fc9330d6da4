#!/usr/bin/env python3
"""bench/container/startup.py: part (a) of bench/container/run.sh, submit -> process running.

Runs ROUNDS rounds; each round has one meshwork sample and one ctr sample, in alternating
order (odd rounds meshwork first, even rounds ctr first), so that both see the same load.

meshwork sample: sleep a random 0-1 s (so that the submission lands at a random phase of the
node's 1 s scheduler and supervisor loops), then t0; `meshctl svc create NAME --image IMG
--replicas 1 --cpu CPU --memory MEM --port 8080` (a fresh NAME per round); then, every
PROBE_MS, look for LISTEN sockets in the replica port range (20000-29999) that were not there
before the round (/proc/net/tcp, /proc/net/tcp6; replicas share the node's network namespace,
here the host's) and GET /index.html on each: "running" is the first answer whose body is this
run's token. The port is checked against `meshctl svc ps --json` afterwards. Then `svc ps
--json` is polled every PS_POLL_MS until the replica's state is "running" (the status meshd
reports; upper bound). From meshd's log: when the scheduler placed the claim, when the image
import (already in containerd: a check) ended, when the container's task was started. Then
`svc rm NAME`, and wait until the container is gone from containerd (`ctr -n NS c ls -q`).

ctr sample: t0; `ctr -n NS run --rm --net-host --cpus CPU --memory-limit MEM --env PORT=P
IMAGE ID` (the image's own command: busybox httpd on $PORT, the same process meshd starts),
GET /index.html on P every PROBE_MS until it answers with the token; then `ctr task kill -s
SIGKILL ID` and wait for `ctr run --rm` to exit (the container removed).

Prints one line per sample and writes all samples as JSON to OUT.
"""
import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

PORT_LO, PORT_HI = 20000, 29999


def listening_ports():
    ports = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(f) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    if parts[3] == "0A":  # LISTEN
                        p = int(parts[1].rsplit(":", 1)[1], 16)
                        if PORT_LO <= p <= PORT_HI:
                            ports.add(p)
        except OSError:
            pass
    return ports


def http_get(port, timeout=0.25):
    """Body of GET /index.html on 127.0.0.1:port, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /index.html HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
            return None
        return body
    except OSError:
        return None


def free_port(lo=30000, hi=30999):
    for p in random.sample(range(lo, hi), hi - lo):
        ok = True
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_STREAM)
            try:
                s.bind((addr, p))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return p
    raise SystemExit("no free port in 30000-30999")


LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s")


def log_time(line):
    m = LOG_TS.match(line)
    if not m:
        return None
    head, frac = m.group(1).split(".")
    dt = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return dt.timestamp() + float("0." + frac)


class Run:
    def __init__(self, a):
        self.a = a
        self.token = a.token.encode()
        self.log_pos = 0
        self.samples = []

    def meshctl(self, *args, timeout=30):
        return subprocess.run([self.a.meshctl, "--endpoint", self.a.endpoint, *args],
                              capture_output=True, text=True, timeout=timeout)

    def ctr(self, *args, timeout=30):
        return subprocess.run(["ctr", "-n", self.a.namespace, *args],
                              capture_output=True, text=True, timeout=timeout)

    def new_log_lines(self):
        with open(self.a.meshd_log, errors="replace") as f:
            f.seek(self.log_pos)
            data = f.read()
            self.log_pos = f.tell()
        return data.splitlines()

    def containers(self):
        r = self.ctr("c", "ls", "-q")
        return set(r.stdout.split())

    # ------------------------------------------------------------------ meshwork
    def meshwork(self, rnd):
        a = self.a
        name = f"{a.prefix}{rnd}"
        time.sleep(random.random())
        before = listening_ports()
        self.new_log_lines()  # skip what came before
        wall0 = time.time()
        t0 = time.monotonic()
        r = self.meshctl("svc", "create", name, "--image", a.image, "--replicas", "1",
                         "--cpu", a.cpu, "--memory", a.memory, "--port", "8080")
        t_cli = time.monotonic() - t0
        if r.returncode != 0:
            raise SystemExit(f"svc create {name} failed: {r.stderr.strip()}")
        rejected = set()
        fails = {}
        port = None
        deadline = t0 + a.timeout
        while port is None:
            now = time.monotonic()
            if now > deadline:
                raise SystemExit(f"{name}: no replica port answered within {a.timeout} s; "
                                 f"ps: {self.meshctl('svc', 'ps', name).stdout}")
            for p in sorted(listening_ports() - before - rejected):
                body = http_get(p)
                if body is None:
                    # Listening but not answering (yet): try again next time; a port that
                    # never answers is someone else's.
                    fails[p] = fails.get(p, 0) + 1
                    if fails[p] >= 5:
                        rejected.add(p)
                    continue
                if body.strip() == self.token:
                    port = p
                    break
                rejected.add(p)  # someone else's server
            else:
                time.sleep(a.probe_ms / 1000)
        t_up = time.monotonic() - t0
        # The state meshd reports, polled until "running".
        t_ps = None
        ps_port = None
        states = []
        while time.monotonic() < deadline:
            r = self.meshctl("svc", "ps", name, "--json")
            tp = time.monotonic() - t0
            try:
                rows = json.loads(r.stdout)
            except ValueError:
                rows = []
            if rows:
                st = rows[0].get("state")
                ps_port = rows[0].get("port")
                if not states or states[-1][0] != st:
                    states.append((st, round(tp * 1000, 1)))
                if st == "running":
                    t_ps = tp
                    break
            time.sleep(a.ps_poll_ms / 1000)
        # meshd's log: placed, import checked, task started.
        marks = {}
        for line in self.new_log_lines():
            ts = log_time(line)
            if ts is None:
                continue
            if "placed" in line and f"workload=svc/{name} " in line and "placed" not in marks:
                marks["placed"] = ts - wall0
            elif ("meshwork_node::registry: image imported into containerd" in line
                  and "placed" in marks and "imported" not in marks):
                marks["imported"] = ts - wall0
            elif "replica started" in line and f'service="{name}"' in line:
                marks["started"] = ts - wall0
        # Remove, and wait until containerd has no container of it.
        t_rm0 = time.monotonic()
        r = self.meshctl("svc", "rm", name)
        if r.returncode != 0:
            raise SystemExit(f"svc rm {name} failed: {r.stderr.strip()}")
        gone = None
        while time.monotonic() < t_rm0 + a.timeout:
            if not any(c.startswith(f"{name}-0-") for c in self.containers()):
                gone = time.monotonic() - t_rm0
                break
            time.sleep(0.1)
        if gone is None:
            raise SystemExit(f"{name}: container still in containerd {a.timeout} s after svc rm")
        s = {"kind": "meshwork", "round": rnd, "name": name, "create_cli_ms": t_cli * 1000,
             "up_ms": t_up * 1000, "ps_running_ms": None if t_ps is None else t_ps * 1000,
             "port": port, "ps_port": ps_port, "states": states,
             "log_ms": {k: v * 1000 for k, v in marks.items()}, "rm_gone_ms": gone * 1000}
        self.samples.append(s)
        lm = s["log_ms"]
        fmt = lambda k: f"{lm[k]:7.1f}" if k in lm else "      ?"
        print(f"  (a) round {rnd:2d} meshwork: port answers {t_up*1000:7.1f} ms "
              f"(create returned {t_cli*1000:5.1f}; meshd log: placed {fmt('placed')}, "
              f"import checked {fmt('imported')}, task started {fmt('started')}); "
              f"ps 'running' {'?' if t_ps is None else f'{t_ps*1000:.0f}'} ms; "
              f"port {port}{'' if ps_port == port else f' (ps says {ps_port}!)'}; "
              f"svc rm -> gone {gone*1000:.0f} ms", flush=True)

    # ------------------------------------------------------------------ ctr
    def ctr_sample(self, rnd):
        a = self.a
        cid = f"{a.prefix}ctr-{rnd}"
        port = free_port()
        cmd = ["ctr", "-n", a.namespace, "run", "--rm", "--net-host", "--cpus", a.ctr_cpus,
               "--memory-limit", str(a.memory_bytes), "--env", f"PORT={port}",
               a.ctr_image, cid]
        log = open(os.path.join(a.work, f"{cid}.log"), "w")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = t0 + a.timeout
            while True:
                body = http_get(port)
                if body is not None and body.strip() == self.token:
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"ctr run {cid} exited ({proc.returncode}) before its port "
                                     f"answered: {open(log.name).read()[-500:]}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"ctr run {cid}: port {port} not answering after {a.timeout} s")
                time.sleep(a.probe_ms / 1000)
            t_up = time.monotonic() - t0
        finally:
            t_k = time.monotonic()
            self.ctr("task", "kill", "-s", "SIGKILL", cid)
            try:
                proc.wait(timeout=a.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            gone = time.monotonic() - t_k
            log.close()
        if cid in self.containers():
            raise SystemExit(f"ctr run --rm {cid} left its container behind")
        s = {"kind": "ctr", "round": rnd, "up_ms": t_up * 1000, "port": port,
             "kill_gone_ms": gone * 1000}
        self.samples.append(s)
        print(f"  (a) round {rnd:2d} ctr:      port answers {t_up*1000:7.1f} ms "
              f"(ctr run --rm, port {port}); kill -> gone {gone*1000:.0f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshctl", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--meshd-log", required=True)
    ap.add_argument("--image", required=True, help="mesh image tag, e.g. web:1")
    ap.add_argument("--ctr-image", required=True, help="containerd image name")
    ap.add_argument("--token", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cpu", default="100m")
    ap.add_argument("--ctr-cpus", default="0.1")
    ap.add_argument("--memory", default="32Mi")
    ap.add_argument("--memory-bytes", type=int, default=32 << 20)
    ap.add_argument("--probe-ms", type=float, default=2)
    ap.add_argument("--ps-poll-ms", type=float, default=20)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--prefix", default="bench-a-")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    random.seed(a.seed)
    run = Run(a)
    try:
        for rnd in range(1, a.rounds + 1):
            if rnd % 2:
                run.meshwork(rnd)
                run.ctr_sample(rnd)
            else:
                run.ctr_sample(rnd)
                run.meshwork(rnd)
    finally:
        with open(a.out, "w") as f:
            json.dump(run.samples, f)


if __name__ == "__main__":
    sys.exit(main())
