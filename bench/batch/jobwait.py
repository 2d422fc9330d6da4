#!/usr/bin/env python3
"""bench/batch/jobwait.py: waits until batch jobs have ended, and summarizes their attempts.

  jobwait.py --meshctl M --endpoint E --t0 EPOCH_S [--id ID | --ids-file F] [--expect N]
             [--interval S] [--timeout S] --out SUMMARY.json

Polls `meshctl job show ID --json` (one job: until every index is SUCCEEDED or FAILED) or
`meshctl job ls --json` (several; only the listed ids count: until every job is SUCCEEDED or
FAILED; `job ls` carries no attempts, so each job is then read once with `job show`, after the
end was seen) every --interval seconds (bounded by --timeout); prints a progress line every
2 s. Then writes a summary: when the end was observed, the earliest attempt start and the
latest attempt end (node clocks: the same host), indices per state, attempts per node, and
attempt run times (ended - started).
Exits 1 on timeout (the summary is still written, with "timed_out": true).
"""
import argparse
import json
import subprocess
import sys
import time


def pct(v, p):
    v = sorted(v)
    if not v:
        return None
    i = max(1, -(-p * len(v) // 100))  # nearest rank
    return v[int(i) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshctl", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--t0", type=float, required=True, help="submit start, epoch seconds")
    ap.add_argument("--id")
    ap.add_argument("--ids-file")
    ap.add_argument("--expect", type=int, default=0, help="indices expected in all")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ids = None
    if a.ids_file:
        with open(a.ids_file) as f:
            ids = {line.strip() for line in f if line.strip()}
    if a.id:
        cmd = [a.meshctl, "--endpoint", a.endpoint, "job", "show", a.id, "--json"]
    else:
        cmd = [a.meshctl, "--endpoint", a.endpoint, "job", "ls", "--json"]
    deadline = time.time() + a.timeout
    last_print = 0.0
    polls = 0
    poll_ms = []
    jobs = []
    done = False
    while time.time() < deadline:
        t = time.time()
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=30, check=True).stdout
            data = json.loads(out)
        except (subprocess.SubprocessError, json.JSONDecodeError) as e:
            print(f"  poll failed: {e}", file=sys.stderr)
            time.sleep(a.interval)
            continue
        poll_ms.append((time.time() - t) * 1000)
        polls += 1
        jobs = [data] if a.id else [j for j in data if ids is None or j["id"] in ids]
        states = {}
        n = 0
        if a.id:
            for ix in data["indices"]:
                states[ix["state"]] = states.get(ix["state"], 0) + 1
                n += 1
        else:
            for j in jobs:
                states[j["state"]] = states.get(j["state"], 0) + 1
                n += 1
        ended = states.get("SUCCEEDED", 0) + states.get("FAILED", 0)
        if time.time() - last_print >= 2:
            last_print = time.time()
            print(f"  +{time.time() - a.t0:6.1f} s: {len(jobs)} jobs, {n} {'indices' if a.id else 'jobs'}: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(states.items())), flush=True)
        if n > 0 and ended == n and (a.expect == 0 or n >= a.expect):
            done = True
            break
        time.sleep(max(0.0, a.interval - (time.time() - t)))
    observed = time.time()
    if not a.id:
        # `job ls` has no attempts: read each job once (not part of the timed wait).
        full = []
        for j in jobs:
            try:
                out = subprocess.run([a.meshctl, "--endpoint", a.endpoint, "job", "show", j["id"], "--json"],
                                     capture_output=True, timeout=30, check=True).stdout
                full.append(json.loads(out))
            except (subprocess.SubprocessError, json.JSONDecodeError) as e:
                print(f"  job show {j['id']} failed: {e}", file=sys.stderr)
        jobs = full
    starts, ends, runs, per_node, states, attempts, failed_reasons = [], [], [], {}, {}, 0, {}
    for j in jobs:
        for ix in j["indices"]:
            states[ix["state"]] = states.get(ix["state"], 0) + 1
            for at in ix["attempts"]:
                attempts += 1
                per_node[at["node"]] = per_node.get(at["node"], 0) + 1
                if at["started_ms"]:
                    starts.append(at["started_ms"])
                if at["ended_ms"]:
                    ends.append(at["ended_ms"])
                    if at["started_ms"]:
                        runs.append(at["ended_ms"] - at["started_ms"])
                if at["state"] == "FAILED":
                    failed_reasons[at["reason"]] = failed_reasons.get(at["reason"], 0) + 1
    summary = {
        "timed_out": not done,
        "observed_s": observed - a.t0,
        "first_start_s": (min(starts) / 1000 - a.t0) if starts else None,
        "last_end_s": (max(ends) / 1000 - a.t0) if ends else None,
        "jobs": len(jobs),
        "states": states,
        "attempts": attempts,
        "per_node": per_node,
        "failed_reasons": failed_reasons,
        "run_ms_p50": pct(runs, 50),
        "run_ms_p90": pct(runs, 90),
        "run_ms_max": max(runs) if runs else None,
        # attempts ended in each second after t0 (the rate over the run)
        "ends_per_s": [sum(1 for e in ends if k <= e / 1000 - a.t0 < k + 1)
                       for k in range(int(max(ends) / 1000 - a.t0) + 1)] if ends else [],
        "polls": polls,
        "poll_ms_p50": pct(poll_ms, 50),
    }
    with open(a.out, "w") as f:
        json.dump(summary, f)
    sys.exit(0 if done else 1)


if __name__ == "__main__":
    main()
