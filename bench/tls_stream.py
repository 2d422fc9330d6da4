#!/usr/bin/env python3
"""Baseline for bench/pull: one encrypted TCP stream on loopback, nothing else.

A forked sender writes MIB MiB over TLS 1.3 (OpenSSL through Python's ssl module; AES-256-GCM
with AES-NI where the CPU has it) to a receiver that discards the bytes. No hashing, no disk:
encryption alone, next to iperf3's plain TCP. A reference, not a bound: Python's per-call
overhead shows (a Rust rustls stream with AES-GCM moved 2.9 GB/s on the same loopback on
2026-11-28, against 1.8-2.1 GB/s here). Prints "<MB/s> <protocol> <cipher>" (MB = 10^6 bytes).

Usage: tls_stream.py CERT_DIR [MIB]   (CERT_DIR holds c.pem and k.pem; made with openssl if not)
"""
import os
import socket
import ssl
import subprocess
import sys
import time

cert_dir = sys.argv[1]
mib = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
cert, key = os.path.join(cert_dir, "c.pem"), os.path.join(cert_dir, "k.pem")
if not os.path.exists(cert):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
pid = os.fork()
if pid == 0:  # the sender
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    conn, _ = listener.accept()
    tls = ctx.wrap_socket(conn, server_side=True)
    block = os.urandom(1 << 20)
    for _ in range(mib):
        tls.sendall(block)
    tls.close()
    os._exit(0)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
tls = ctx.wrap_socket(socket.create_connection(listener.getsockname()))
buf = bytearray(1 << 20)
view = memoryview(buf)
first = tls.recv_into(view)  # the clock starts once bytes flow (handshake done)
t0 = time.monotonic()
got = first
while got < mib << 20:
    n = tls.recv_into(view)
    if n == 0:
        break
    got += n
elapsed = time.monotonic() - t0
os.waitpid(pid, 0)
if got < mib << 20:
    sys.exit(f"tls_stream: got {got} of {mib << 20} bytes")
# Only the bytes that arrived after the clock started count.
print(f"{(got - first) / elapsed / 1e6:.1f} {tls.version()} {tls.cipher()[0]}")
