"""The DataLoader baselines the streaming plane is set against, on the same sampled segments:

- **lean** (:class:`DecodeFlowClips`): a plain torch DataLoader whose processes run the workers' own lean
  functions, ``decode_segment`` in the frame format the decode worker uses (gray for flow alone) and the
  same flow extractor: the plane's overhead is what the plane costs beyond this;
- **user-written** (:class:`UserFlowClips`): the same work as a user would write it, frame by frame with
  PyAV and OpenCV in ``__getitem__``;
- **two DataLoaders** (:func:`measure_two_dataloaders`): one per stream of a two-stream network, iterated
  concurrently, each written with the lean functions: the RGB loader decodes only the frame it needs
  (:class:`MiddleFrameClips`), the flow loader the gray stack.

The classic write-to-disk pipeline is :mod:`essp.bench.classic`."""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from essp.bench.options import BenchOptions
from essp.bench.percore import _one_thread
from essp.bench.processes import ProcessMeter, cpu_seconds, write_bytes

if TYPE_CHECKING:
    from essp.dataplane.plan import EpochPlan

Job = tuple[str, int, int]  # (video URI, first frame, label)
# OpenCV's DIS presets by the plane's method name; a method that is no DIS preset maps to the fast one
# (the user-written baseline is DIS "as a user would write it").
DIS_PRESET_NAMES = {"dis_ultrafast": "DISOPTICAL_FLOW_PRESET_ULTRAFAST", "dis_fast": "DISOPTICAL_FLOW_PRESET_FAST",
                    "dis_medium": "DISOPTICAL_FLOW_PRESET_MEDIUM"}


def dis_preset(method: str) -> int:
    """The OpenCV DIS preset of the plane's flow method (DIS fast for a method that is no DIS preset)."""
    import cv2

    return int(getattr(cv2, DIS_PRESET_NAMES.get(method, DIS_PRESET_NAMES["dis_fast"])))


class DecodeFlowClips:
    """The lean DataLoader's map-style dataset (what ``torch.utils.data.Dataset`` asks for: ``__len__`` and
    ``__getitem__``): per item it decodes the job's L+1 frames from video bytes held in memory (fetched
    once from S3, as the decode worker's cache holds them) in the format the decode worker would use for
    the flow stream, and computes the same quantised flow stack as the flow worker. Items are (flow,
    label, frames decoded, frames used). Defined without importing torch, so that the CLI stays light."""

    def __init__(self, videos: dict[str, bytes], jobs: list[Job], length: int, size: int, method: str) -> None:
        from essp.dataplane.extractors import frames_format

        self.videos, self.jobs, self.length, self.size, self.method = videos, jobs, length, size, method
        self.features = {"flow": {"method": method}}
        self.pix_fmt = frames_format(self.features)
        self._extractor = None

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int, int]:
        from essp.dataplane.extractors import create_extractor
        from essp.datasets.video import decode_segment

        if self._extractor is None:  # one per loader process (OpenCV objects are not shared)
            self._extractor = create_extractor("flow", self.features["flow"])
        uri, offset, label = self.jobs[index]
        stats: dict[str, int] = {}
        frames = decode_segment(self.videos[uri], uri, offset, self.length + 1, (self.size, self.size),
                                pix_fmt=self.pix_fmt, stats=stats)
        return self._extractor.extract(frames), label, stats["decoded"], stats["used"]


class MiddleFrameClips:
    """The RGB stream's lean dataset: only the one frame the RGB extractor takes (index L//2 of the L+1),
    decoded from the keyframe before it, as (3, H, W) uint8."""

    def __init__(self, videos: dict[str, bytes], jobs: list[Job], length: int, size: int) -> None:
        from essp.dataplane.extractors import RgbExtractor

        self.videos, self.jobs, self.size = videos, jobs, size
        self.index = RgbExtractor.frame_index(length + 1)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int, int]:
        from essp.datasets.video import decode_segment

        uri, offset, label = self.jobs[index]
        stats: dict[str, int] = {}
        frame = decode_segment(self.videos[uri], uri, offset + self.index, 1, (self.size, self.size),
                               pix_fmt="rgb24", stats=stats)
        return np.ascontiguousarray(frame[0].transpose(2, 0, 1)), label, stats["decoded"], stats["used"]


class UserFlowClips:
    """The flow stack written as a user would, frame by frame in ``__getitem__``: PyAV opens the bytes,
    seeks to the keyframe before the first frame and decodes; each frame goes to RGB, is resized with
    OpenCV and turned gray; OpenCV's DIS (the plane's preset) gives each pair's flow, quantised like the
    flow extractor (clip to ±bound, 128 for zero). Items as :class:`DecodeFlowClips`'s."""

    def __init__(self, videos: dict[str, bytes], jobs: list[Job], length: int, size: int, method: str) -> None:
        from essp.dataplane.extractors import DEFAULT_FLOW_BOUND

        self.videos, self.jobs, self.length, self.size = videos, jobs, length, size
        self.preset, self.bound = dis_preset(method), float(DEFAULT_FLOW_BOUND)
        self._dis: Any = None

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int, int]:
        import cv2

        from essp.datasets.frames import open_video

        if self._dis is None:
            self._dis = cv2.DISOpticalFlow_create(self.preset)
        uri, offset, label = self.jobs[index]
        grays: list[np.ndarray] = []
        decoded = 0
        with open_video(self.videos[uri], uri) as container:  # the allowed containers, no protocol
            stream = container.streams.video[0]
            fps = float(stream.average_rate)
            container.seek(int(offset / fps / stream.time_base), stream=stream)  # backward, to a keyframe
            for frame in container.decode(stream):
                decoded += 1
                if round(frame.time * fps) < offset:
                    continue
                rgb = cv2.resize(frame.to_ndarray(format="rgb24"), (self.size, self.size),
                                 interpolation=cv2.INTER_AREA)
                grays.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
                if len(grays) == self.length + 1:
                    break
        if len(grays) < self.length + 1:
            raise RuntimeError(f"{uri}: {len(grays)} frames from {offset}, {self.length + 1} expected")
        flow = np.empty((2 * self.length, self.size, self.size), np.uint8)
        scale = 127.5 / self.bound
        for t in range(self.length):
            pair = self._dis.calc(grays[t], grays[t + 1], None)
            flow[2 * t:2 * t + 2] = np.clip(pair * scale + 128.0, 0, 255).astype(np.uint8).transpose(2, 0, 1)
        return flow, label, decoded, len(grays)


def _loader_init(_worker: int) -> None:
    _one_thread()


def _start_method() -> str:
    """``fork``: a plain DataLoader's default on Linux. The loaders and pools here all run before the
    streaming part starts Kafka and Redis client threads in this process, and OpenCV's own pool is
    held to one thread (see bench_dataplane): forking a process whose other threads hold locks could
    leave the children waiting forever (the DataLoader's timeout turns that into an error)."""
    return "fork"


def _loader(dataset: Any, workers: int, batch_size: int) -> Any:
    from torch.utils.data import DataLoader

    with warnings.catch_warnings():
        # More loader processes than cores is the comparison asked for (as many as the streaming run has).
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=_loader_init,
                          shuffle=False, timeout=300, multiprocessing_context=_start_method())


class _Drain:
    """One DataLoader's epoch: its iterator is made (its processes fork) by the caller's thread, then
    :meth:`run` takes every batch, checks its shape, and reads the loader processes' CPU and disk writes
    after each batch (they are gone once the iterator is exhausted)."""

    def __init__(self, dataset: Any, workers: int, batch_size: int, expect: tuple[int, ...]) -> None:
        self.workers, self.batch_size, self.expect = workers, batch_size, expect
        self.started = time.perf_counter()
        self.batches = iter(_loader(dataset, workers, batch_size))
        # The loader's processes (a private attribute, hence the fallback).
        self.pids = [w.pid for w in getattr(self.batches, "_workers", [])]
        self.seen: dict[int, tuple[float | None, int | None]] = {}
        self.first = self.last = None
        self.first_size = self.count = 0
        self.decoded = self.used = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        import torch

        try:
            for batch in self.batches:
                now = time.perf_counter()
                arrays = batch[0]
                if tuple(arrays.shape[1:]) != self.expect or arrays.dtype != torch.uint8:
                    raise RuntimeError(f"DataLoader batch of shape {tuple(arrays.shape)} {arrays.dtype}, expected "
                                       f"(B, *{self.expect}) uint8")
                if self.first is None:
                    self.first, self.first_size = now, len(arrays)
                self.last = now
                self.count += len(arrays)
                if len(batch) >= 4:
                    self.decoded += int(batch[2].sum())
                    self.used += int(batch[3].sum())
                for pid in self.pids:
                    cpu, disk = cpu_seconds(pid), write_bytes(pid)
                    if cpu is not None:
                        self.seen[pid] = (cpu, disk)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        assert self.first is not None and self.last is not None
        span = self.last - self.first
        cpu_s = sum(c or 0.0 for c, _ in self.seen.values()) if self.seen else None
        known = self.used > 0
        return {"num_workers": self.workers, "batch_size": self.batch_size, "samples": self.count,
                "start_method": _start_method(), "first_batch_s": self.first - self.started, "span_s": span,
                "samples_per_s": (self.count - self.first_size) / span if span > 0 else None,
                "total_s": self.last - self.started, "loader_cpu_s": cpu_s,
                "loader_write_bytes": sum(d or 0 for _, d in self.seen.values()) if self.seen else None,
                "frames_decoded": self.decoded if known else None, "frames_used": self.used if known else None,
                "decoded_per_used": self.decoded / self.used if known else None}


def _with_one_torch_thread(run: Any) -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def _finish(row: dict[str, Any], main_cpu_s: float | None, meter: ProcessMeter, length: int) -> dict[str, Any]:
    """The main process's CPU and disk writes over the iteration, and the per-sample figures."""
    row["main_cpu_s"] = main_cpu_s
    row["disk_bytes_main"] = meter.deltas()["bench"]["write_bytes"]
    row["disk_bytes"] = (row["disk_bytes_main"] or 0) + (row["loader_write_bytes"] or 0)
    total = (row["loader_cpu_s"] or 0.0) + (main_cpu_s or 0.0)
    row["cpu_s"] = total
    row["cpu_ms_per_sample"] = 1000 * total / row["samples"] if row["samples"] else None
    row["loader_cpu_ms_per_sample"] = (1000 * row["loader_cpu_s"] / row["samples"]
                                       if row["loader_cpu_s"] and row["samples"] else None)
    row["flow_frames_per_s"] = row["samples_per_s"] * length if row["samples_per_s"] else None
    return row


def _jobs(plan: EpochPlan) -> list[Job]:
    return [(j.video, j.offset, j.label) for j in plan.jobs]


def measure_dataloader(videos: dict[str, bytes], plan: EpochPlan, options: BenchOptions, workers: int, *,
                       style: str = "lean") -> dict[str, Any]:
    """One DataLoader epoch of the plan's flow stacks with ``workers`` processes: ``style`` "lean" (the
    workers' functions) or "user" (PyAV + OpenCV frame by frame). CPU: the loader processes and this one."""
    size, length = options.pipeline_size, options.length
    kind = {"lean": DecodeFlowClips, "user": UserFlowClips}[style]
    dataset = kind(videos, _jobs(plan), length, size, options.pipeline_method)
    meter = ProcessMeter({"bench": [os.getpid()]})

    def run() -> dict[str, Any]:
        cpu0 = cpu_seconds()
        drain = _Drain(dataset, workers, options.batch_size, (2 * length, size, size))
        drain.run()
        row = drain.result()
        cpu1 = cpu_seconds()
        return _finish(row, None if cpu0 is None or cpu1 is None else cpu1 - cpu0, meter, length)

    row = _with_one_torch_thread(run)
    row["style"] = style
    row["pix_fmt"] = getattr(dataset, "pix_fmt", "rgb24")
    return row


def measure_two_dataloaders(videos: dict[str, bytes], plan: EpochPlan, options: BenchOptions,
                            per_kind: int = 1) -> dict[str, Any]:
    """The two streams' DataLoaders on the plan's samples, iterated concurrently (one thread each): RGB
    with ``per_kind`` processes decoding only its frame, flow with twice as many decoding the gray stack
    (as many processes in all as the plane's decode, flow and rgb workers). The rate is samples per
    second from the first batch of either to the last batch of both."""
    size, length = options.pipeline_size, options.length
    jobs = _jobs(plan)
    rgb_set = MiddleFrameClips(videos, jobs, length, size)
    flow_set = DecodeFlowClips(videos, jobs, length, size, options.pipeline_method)
    meter = ProcessMeter({"bench": [os.getpid()]})

    def run() -> dict[str, Any]:
        cpu0 = cpu_seconds()
        drains = {"rgb": _Drain(rgb_set, per_kind, options.batch_size, (3, size, size)),
                  "flow": _Drain(flow_set, 2 * per_kind, options.batch_size, (2 * length, size, size))}
        threads = [threading.Thread(target=d.run, name=f"bench-loader-{name}") for name, d in drains.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rows = {name: d.result() for name, d in drains.items()}
        cpu1 = cpu_seconds()
        first = min(d.first for d in drains.values())  # type: ignore[type-var]
        last = max(d.last for d in drains.values())  # type: ignore[type-var]
        started = min(d.started for d in drains.values())
        first_sizes = sum(d.first_size for d in drains.values() if d.first == first)
        loader_cpu = sum(r["loader_cpu_s"] or 0.0 for r in rows.values())
        main_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        samples = len(jobs)
        total = loader_cpu + (main_cpu or 0.0)
        return {"streams": rows, "samples": samples, "processes": sum(d.workers for d in drains.values()),
                "delivered": {name: r["samples"] for name, r in rows.items()},
                "span_s": last - first, "total_s": last - started,
                "samples_per_s": (samples - min(first_sizes, samples - 1)) / (last - first) if last > first else None,
                "samples_per_s_from_start": samples / (last - started),
                "main_cpu_s": main_cpu, "loader_cpu_s": loader_cpu, "cpu_s": total,
                "cpu_ms_per_sample": 1000 * total / samples,
                "disk_bytes": (meter.deltas()["bench"]["write_bytes"] or 0)
                + sum(r["loader_write_bytes"] or 0 for r in rows.values())}

    return _with_one_torch_thread(run)
