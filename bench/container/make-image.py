#!/usr/bin/env python3
"""bench/container/make-image.py: writes a single-layer OCI image layout tar for the benchmark.

The same layout `meshwork_client::oci::write_oci_layout_tar` writes (and `web_image()` in
node/tests/services.rs uses): `oci-layout`, `index.json` and `blobs/sha256/` holding the
manifest, the config (linux/amd64, `config.Cmd`, `config.Env` PATH) and one uncompressed layer
tar. The layer holds Debian's /bin/busybox as bin/busybox and bin/sh, and www/index.html with
the given body; extra files can be added with --file (e.g. a static server binary).

Usage:
  make-image.py OUT.tar --body TEXT [--file DEST=SRC[:MODE]]... [--cmd ARG]...
The default command serves /www with busybox httpd on $PORT in the foreground, without
per-request logging:
  /bin/sh -c 'exec /bin/busybox httpd -f -p "$PORT" -h /www'
Prints the manifest digest (sha256:...). Everything is deterministic (mtime 0, uid/gid 0).
"""
import argparse
import hashlib
import io
import json
import os
import tarfile

DEFAULT_CMD = ["/bin/sh", "-c", 'exec /bin/busybox httpd -f -p "$PORT" -h /www']
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tar_bytes(entries):
    """entries: list of (name, bytes, mode); directories are added for them."""
    buf = io.BytesIO()
    seen = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, data, mode in entries:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in seen:
                    seen.add(d)
                    ti = tarfile.TarInfo(d + "/")
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                    t.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 0
            ti.uid = ti.gid = 0
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--body", required=True, help="contents of www/index.html")
    ap.add_argument("--file", action="append", default=[], metavar="DEST=SRC[:MODE]")
    ap.add_argument("--cmd", action="append", default=None, metavar="ARG",
                    help="the image command, one argument per --cmd (default: busybox httpd)")
    ap.add_argument("--busybox", default="/bin/busybox")
    a = ap.parse_args()

    with open(a.busybox, "rb") as f:
        busybox = f.read()
    files = [("bin/busybox", busybox, 0o755), ("bin/sh", busybox, 0o755),
             ("www/index.html", a.body.encode(), 0o644)]
    for spec in a.file:
        dest, src = spec.split("=", 1)
        mode = 0o755
        if ":" in src:
            src, m = src.rsplit(":", 1)
            mode = int(m, 8)
        with open(src, "rb") as f:
            files.append((dest.lstrip("/"), f.read(), mode))

    layer = tar_bytes(files)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": a.cmd or DEFAULT_CMD, "Env": [PATH_ENV]},
        "rootfs": {"type": "layers", "diff_ids": [sha(layer)]},
    }, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha(layer), "size": len(layer)}],
    }, separators=(",", ":")).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": sha(manifest), "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }, separators=(",", ":")).encode()
    blobs = [("blobs/sha256/" + sha(b)[7:], b, 0o644) for b in (layer, config, manifest)]
    out = tar_bytes([("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', 0o644),
                     ("index.json", index, 0o644)] + blobs)
    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, a.out)
    print(sha(manifest))


if __name__ == "__main__":
    main()
