"""Write a root filesystem as a `docker save` archive (one layer), for `ctr images import`.

No registry is reachable here, so the e2e cluster's pause image is made from a folder:
    python3 image_tar.py --rootfs DIR --tag essp.local/pause:3.4 --entrypoint /pause --out pause.tar
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rootfs", required=True, type=Path)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--entrypoint", nargs="+", default=[])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for path in sorted(args.rootfs.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(args.rootfs)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isfile():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": args.entrypoint, "User": "65535:65535"},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}, "history": [{"created_by": "image_tar.py"}]}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [args.tag], "Layers": ["layer.tar"]}]
    with tarfile.open(args.out, mode="w") as out:
        for name, data in (("layer.tar", layer_bytes), (config_name, config_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            out.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
