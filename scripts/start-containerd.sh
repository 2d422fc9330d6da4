#!/usr/bin/env bash
# Starts Debian's containerd in the background (no systemd needed) and waits until it
# answers. Used by .ci/run; harmless when containerd already runs.
set -euo pipefail
log=${CONTAINERD_LOG:-/var/log/containerd-meshwork.log}
if ctr --connect-timeout 2s version >/dev/null 2>&1; then
  exit 0
fi
rm -f /run/containerd/containerd.sock
nohup containerd >"$log" 2>&1 &
for _ in $(seq 1 60); do
  ctr --connect-timeout 2s version >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "containerd did not start; last lines of $log:" >&2
tail -50 "$log" >&2
exit 1
