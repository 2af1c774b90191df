#!/usr/bin/env python3
"""Write a one-layer OCI image archive (for ``ctr images import``) from a root directory.

usage: oci_archive.py ROOTDIR IMAGE_NAME OUT.tar ENTRYPOINT [ARG...]

No registry, no buildah: layer tar + config + manifest + index, all content-addressed, with
mtimes zeroed and owners root, so the same input gives the same image id.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile

OCI = "application/vnd.oci.image"


def _norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = 0
    return ti


def layer_tar(root: str) -> bytes:
    """The root directory as one reproducible tar layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for n in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, n)
                t.add(full, arcname=os.path.relpath(full, root), recursive=False, filter=_norm)
    return buf.getvalue()


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def archive(root: str, name: str, entrypoint: list[str]) -> tuple[bytes, str]:
    """The OCI archive of ``root`` as image ``name``, and its manifest digest."""
    layer = layer_tar(root)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        "history": [{"created_by": "oci_archive.py " + " ".join(entrypoint)}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": f"{OCI}.manifest.v1+json",
        "config": {"mediaType": f"{OCI}.config.v1+json", "digest": _digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": f"{OCI}.layer.v1.tar", "digest": _digest(layer),
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": f"{OCI}.index.v1+json",
        "manifests": [{"mediaType": f"{OCI}.manifest.v1+json", "digest": _digest(manifest),
                       "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name":
                                           name.rsplit(":", 1)[1]}}],
    }, sort_keys=True).encode()
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
    files += [("blobs/sha256/" + _digest(b).split(":")[1], b) for b in (layer, config, manifest)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path, blob in files:
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode, ti.mtime = len(blob), 0o644, 0
            t.addfile(ti, io.BytesIO(blob))
    return buf.getvalue(), _digest(manifest)


def main(argv: list[str]) -> int:
    """Command line: see the module docstring."""
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    root, name, out, *entrypoint = argv
    data, digest = archive(root, name, entrypoint)
    with open(out, "wb") as fh:
        fh.write(data)
    print(out, name, digest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
