"""The baselines the streaming plane is set against: a plain torch DataLoader whose processes decode
and compute the flow, and the classic pipeline that writes frames and flow to disk as JPEGs and reads
the stacks back."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from essp.bench.options import BenchOptions
from essp.bench.percore import _one_thread
from essp.bench.processes import ProcessMeter, cpu_seconds, write_bytes

if TYPE_CHECKING:
    from essp.dataplane.plan import EpochPlan
    from essp.datasets.manifest import Manifest


class DecodeFlowClips:
    """The DataLoader baseline's map-style dataset (what ``torch.utils.data.Dataset`` asks for:
    ``__len__`` and ``__getitem__``): per item it decodes the job's L+1 frames from video bytes held in
    memory (fetched once from S3, as the decode worker's cache holds them) and computes the same
    quantised flow stack as the flow worker. Defined without importing torch, so that the CLI stays
    light; the DataLoader treats it as any Dataset."""

    def __init__(self, videos: dict[str, bytes], jobs: list[tuple[str, int, int]], length: int, size: int,
                 method: str) -> None:
        self.videos, self.jobs, self.length, self.size, self.method = videos, jobs, length, size, method
        self._extractor = None

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from essp.dataplane.extractors import create_extractor
        from essp.datasets.video import decode_segment

        if self._extractor is None:  # one per loader process (OpenCV objects are not shared)
            self._extractor = create_extractor("flow", {"method": self.method})
        uri, offset, label = self.jobs[index]
        frames = decode_segment(self.videos[uri], uri, offset, self.length + 1, (self.size, self.size))
        return self._extractor.extract(frames), label


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


def _loader_init(_worker: int) -> None:
    _one_thread()


def _start_method() -> str:
    """``fork``: a plain DataLoader's default on Linux. The loaders and pools here all run before the
    streaming part starts Kafka and Redis client threads in this process, and OpenCV's own pool is
    held to one thread (see bench_dataplane): forking a process whose other threads hold locks could
    leave the children waiting forever (the DataLoader's timeout turns that into an error)."""
    return "fork"


def _run_loader(dataset: Any, workers: int, batch_size: int, expect: tuple[int, ...]) -> dict[str, Any]:
    """Iterate a plain DataLoader once: time to first batch and samples/s from the first batch on."""
    import torch

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _iterate(dataset, workers, batch_size, expect)
    finally:
        torch.set_num_threads(torch_threads)


def _iterate(dataset: Any, workers: int, batch_size: int, expect: tuple[int, ...]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    method = _start_method()
    threads = [t.name for t in threading.enumerate()]
    started = time.perf_counter()
    first = last = None
    first_size = count = 0
    with warnings.catch_warnings():
        # More loader processes than cores is the comparison asked for (as many as the streaming run has).
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=_loader_init,
                            shuffle=False, timeout=300, multiprocessing_context=method)
        batches = iter(loader)
    # The loader's processes (private attribute, hence the fallback): their CPU and disk writes, read
    # after every batch since they are gone once the iterator is exhausted.
    pids = [w.pid for w in getattr(batches, "_workers", [])]
    seen: dict[int, tuple[float | None, int | None]] = {}
    for flows, _labels in batches:
        now = time.perf_counter()
        if tuple(flows.shape[1:]) != expect or flows.dtype != torch.uint8:
            raise RuntimeError(f"DataLoader batch of shape {tuple(flows.shape)} {flows.dtype}, expected (B, *{expect})")
        if first is None:
            first, first_size = now, len(flows)
        last = now
        count += len(flows)
        for pid in pids:
            cpu, disk = cpu_seconds(pid), write_bytes(pid)
            if cpu is not None:
                seen[pid] = (cpu, disk)
    assert first is not None and last is not None
    span = last - first
    cpu_s = sum(c or 0.0 for c, _ in seen.values()) if seen else None
    return {"num_workers": workers, "batch_size": batch_size, "samples": count, "start_method": method,
            "threads_at_start": threads,
            "first_batch_s": first - started, "span_s": span,
            "samples_per_s": (count - first_size) / span if span > 0 else None,
            "total_s": last - started, "loader_cpu_s": cpu_s,
            "cpu_ms_per_sample": 1000 * cpu_s / count if cpu_s else None,
            "loader_write_bytes": sum(d or 0 for _, d in seen.values()) if seen else None}


def measure_dataloader(videos: dict[str, bytes], plan: EpochPlan, options: BenchOptions,
                       workers: int) -> dict[str, Any]:
    jobs = [(j.video, j.offset, j.label) for j in plan.jobs]
    size, length = options.pipeline_size, options.length
    dataset = DecodeFlowClips(videos, jobs, length, size, options.pipeline_method)
    meter = ProcessMeter({"bench": [os.getpid()]})
    result = _run_loader(dataset, workers, options.batch_size, (2 * length, size, size))
    result["disk_bytes_main"] = meter.deltas()["bench"]["write_bytes"]
    result["disk_bytes"] = (result["disk_bytes_main"] or 0) + (result["loader_write_bytes"] or 0)
    result["flow_frames_per_s"] = result["samples_per_s"] * length if result["samples_per_s"] else None
    return result


def _extract_to_disk(uri: str, data: bytes, frames: int, out: Path, size: int, method: str) -> dict[str, int]:
    """The classic extraction of one video: every frame as JPEG, every pair's flow as x/y JPEGs."""
    import cv2

    from essp.dataplane.extractors import create_extractor
    from essp.datasets.video import decode_segment

    _one_thread()
    before = write_bytes() or 0
    folder = out / _folder_name(uri)
    folder.mkdir(parents=True, exist_ok=True)
    stack = decode_segment(data, uri, 0, frames, (size, size))
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
    read = _run_loader(FlowImageClips(out, jobs, length), workers, options.batch_size, (2 * length, size, size))
    shutil.rmtree(out, ignore_errors=True)
    frames = sum(p["frames"] for p in parts)
    return {"videos": len(touched), "frames": frames, "flow_pairs": sum(p["flow_pairs"] for p in parts),
            "files": len(files), "extract_s": extract_s, "extract_frames_per_s": frames / extract_s,
            "file_bytes": image_bytes + flow_bytes, "frame_jpeg_bytes": image_bytes, "flow_jpeg_bytes": flow_bytes,
            "disk_bytes": sum(p["write_bytes"] for p in parts), "read": read,
            "samples_per_s": read["samples_per_s"], "first_batch_s": extract_s + read["first_batch_s"],
            "processes": workers}
