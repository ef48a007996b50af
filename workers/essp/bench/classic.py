"""The classic two-stream recipe the streaming plane is set against: every frame of the epoch's videos
written to disk as JPEG and every pair's quantised flow as x/y JPEGs, then a DataLoader reading the flow
stacks back."""

from __future__ import annotations

import multiprocessing
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from essp.bench.baselines import _Drain, _start_method, _with_one_torch_thread
from essp.bench.options import BenchOptions
from essp.bench.percore import _one_thread
from essp.bench.processes import write_bytes

if TYPE_CHECKING:
    from essp.dataplane.plan import EpochPlan
    from essp.datasets.manifest import Manifest


class FlowImageClips:
    """The classic pipeline's dataset: the L flow pairs of a stack read back from x/y JPEG files."""

    def __init__(self, root: Path, jobs: list[tuple[str, int, int]], length: int) -> None:
        self.root, self.jobs, self.length = root, jobs, length

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        import cv2

        uri, offset, label = self.jobs[index]
        folder = self.root / _folder_name(uri)
        planes = []
        for t in range(offset, offset + self.length):
            for axis in ("x", "y"):
                image = cv2.imread(str(folder / f"flow_{axis}_{t:05d}.jpg"), cv2.IMREAD_GRAYSCALE)
                if image is None:
                    raise FileNotFoundError(folder / f"flow_{axis}_{t:05d}.jpg")
                planes.append(image)
        return np.stack(planes), label


def _folder_name(uri: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", uri.removeprefix("s3://"))


def _extract_to_disk(uri: str, data: bytes, frames: int, out: Path, size: int, method: str) -> dict[str, int]:
    """The classic extraction of one video: every frame as JPEG, every pair's flow as x/y JPEGs."""
    import cv2

    from essp.dataplane.extractors import create_extractor
    from essp.datasets.video import decode_segment

    _one_thread()
    before = write_bytes() or 0
    folder = out / _folder_name(uri)
    folder.mkdir(parents=True, exist_ok=True)
    stack = decode_segment(data, uri, 0, frames, (size, size))  # RGB: the frames are written too
    for t, frame in enumerate(stack):
        cv2.imwrite(str(folder / f"img_{t:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    flow = create_extractor("flow", {"method": method}).extract(stack)  # (2(N-1), H, W), x/y interleaved
    for t in range(frames - 1):
        cv2.imwrite(str(folder / f"flow_x_{t:05d}.jpg"), flow[2 * t])
        cv2.imwrite(str(folder / f"flow_y_{t:05d}.jpg"), flow[2 * t + 1])
    return {"frames": frames, "flow_pairs": frames - 1, "write_bytes": (write_bytes() or 0) - before}


def measure_classic(videos: dict[str, bytes], manifest: Manifest, plan: EpochPlan, options: BenchOptions,
                    workers: int, scratch: Path) -> dict[str, Any]:
    """Extract the epoch's videos to disk with `workers` processes, then read its stacks back."""
    frames_of = {v.uri: v.frames for v in manifest.videos}
    touched = sorted({job.video for job in plan.jobs})
    out = scratch / "classic"
    out.mkdir(parents=True, exist_ok=True)
    size, length = options.pipeline_size, options.length
    started = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(_start_method())) as pool:
        parts = list(pool.map(_extract_to_disk, touched, [videos[u] for u in touched],
                              [frames_of[u] for u in touched], [out] * len(touched), [size] * len(touched),
                              [options.pipeline_method] * len(touched)))
    extract_s = time.perf_counter() - started
    files = [p for p in out.rglob("*") if p.is_file()]
    image_bytes = sum(p.stat().st_size for p in files if p.name.startswith("img_"))
    flow_bytes = sum(p.stat().st_size for p in files if p.name.startswith("flow_"))
    jobs = [(j.video, j.offset, j.label) for j in plan.jobs]

    def read_back() -> dict[str, Any]:
        drain = _Drain(FlowImageClips(out, jobs, length), workers, options.batch_size, (2 * length, size, size))
        drain.run()
        return drain.result()

    read = _with_one_torch_thread(read_back)
    shutil.rmtree(out, ignore_errors=True)
    frames = sum(p["frames"] for p in parts)
    return {"videos": len(touched), "frames": frames, "flow_pairs": sum(p["flow_pairs"] for p in parts),
            "files": len(files), "extract_s": extract_s, "extract_frames_per_s": frames / extract_s,
            "file_bytes": image_bytes + flow_bytes, "frame_jpeg_bytes": image_bytes, "flow_jpeg_bytes": flow_bytes,
            "disk_bytes": sum(p["write_bytes"] for p in parts), "read": read,
            "samples_per_s": read["samples_per_s"], "first_batch_s": extract_s + read["first_batch_s"],
            "processes": workers}
