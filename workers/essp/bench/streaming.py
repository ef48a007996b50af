"""The streaming plane for the bench: real decode and flow worker processes serving epochs that a
SampleStream in this process drains (samples/s, data wait, CPU and disk writes), and the run's
isolated settings and their cleanup. The one module of the data plane bench that calls :mod:`essp.deploy.local`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from essp.bench.options import BenchOptions
from essp.bench.processes import ProcessMeter, service_pids
from essp.deploy.local import LocalProcess, LocalProcesses, worker_args, worker_name
from essp.settings import Settings
from essp.stack.services import isolated_settings, remove_isolated

if TYPE_CHECKING:
    from essp.dataplane.consumer import SampleStream
    from essp.dataplane.plan import EpochPlan
    from essp.datasets.manifest import Manifest


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


def _start_workers(settings: Settings, workers: list[LocalProcess], count: int, log_dir: Path) -> float:
    """Bring the pool to `count` decode and `count` flow workers (their state folder: the parent of
    `log_dir`); returns the seconds until all serve."""
    started = time.perf_counter()
    commands = []
    for index in range(len(workers) // 2, count):
        commands += [(worker_name("decode", index), worker_args("decode")),
                     (worker_name("flow", index), worker_args("flow"))]
    workers += LocalProcesses(settings, state_dir=log_dir.parent).start(commands)
    return time.perf_counter() - started


def measure_streaming(settings: Settings, manifest: Manifest, options: BenchOptions, tag: str, log_dir: Path,
                      say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Samples/s, data wait, CPU and disk writes of the streaming plane with 1, 2, ... workers of each kind.

    Per worker count: a warm-up epoch (group joins, video caches), a drained epoch (throughput, CPU per
    sample) and an epoch consumed at a simulated trainer's pace (data wait). Disk writes are counted
    over all three and the workers' start."""
    from essp.clients.kafka import ensure_topics
    from essp.contract import Topics
    from essp.dataplane.consumer import SampleStream
    from essp.dataplane.payloads import SampleStore

    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.control, topics.events, topics.dead])
    size, length = options.pipeline_size, options.length
    raw_per_sample = {"frames": (length + 1) * size * size * 3, "flow": 2 * length * size * size}
    workers: list[LocalProcess] = []
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
            ensure_topics(settings, topics.run_topics(run, ["flow"], 0))
            say(f"streaming: {count} decode + {count} flow worker(s) serving after {startup_s:.1f}s; run {run}")
            by_kind = {"decode": [w.pid for w in workers if w.name.startswith(worker_name("decode", 0)[:-1])],
                       "flow": [w.pid for w in workers if w.name.startswith(worker_name("flow", 0)[:-1])],
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
