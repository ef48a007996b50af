"""The streaming plane for the bench: real decode and extractor worker processes serving epochs that
SampleStreams in this process drain (samples/s, data wait, CPU by process with its work / overhead split,
broker cost per epoch, disk writes), and the run's isolated settings and their cleanup. With
:mod:`essp.bench.twostreams`, the modules of the data plane bench that call :mod:`essp.deploy.local`."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from essp.bench.accounting import (
    SETTLE_S,
    counter_deltas,
    cpu_split,
    fresh_snapshot,
    sum_seconds,
    work_by_role,
)
from essp.bench.options import BenchOptions
from essp.bench.processes import ProcessMeter, service_pids
from essp.deploy.local import LocalProcess, LocalProcesses, worker_args, worker_name
from essp.settings import Settings
from essp.stack.services import isolated_settings, remove_isolated

if TYPE_CHECKING:
    from essp.dataplane.consumer import SampleStream
    from essp.dataplane.plan import EpochPlan
    from essp.datasets.manifest import Manifest

Say = Callable[[str], None]


def _isolated(settings: Settings, tag: str, heartbeat_s: float | None = None) -> Settings:
    """The run's own prefixes and buckets; its workers heartbeat every ``heartbeat_s`` (their counters are
    exact that soon after an epoch ends)."""
    isolated = isolated_settings(settings, tag)
    return isolated if heartbeat_s is None else isolated.model_copy(update={"heartbeat_s": heartbeat_s})


def cleanup(settings: Settings) -> None:
    """Delete the benchmark's Redis keys, buckets and topics (its prefix is its own)."""
    remove_isolated(settings)


def _plan(manifest: Manifest, run: str, epoch: int, samples: int, options: BenchOptions,
          features: dict[str, dict[str, Any]] | None = None) -> EpochPlan:
    from essp.dataplane.plan import plan_epoch

    size = options.pipeline_size
    features = features or {"flow": {"method": options.pipeline_method}}
    return plan_epoch(manifest, run=run, epoch=epoch, features=features, length=options.length, height=size,
                      width=size, samples=samples, seed=options.seed, max_inflight=options.max_inflight)


def delivery_unit(settings: Settings, plan: EpochPlan) -> int:
    """Samples that travel together through the plane (one chunk message), so that a rate taken from the
    first arrival counts the samples after the first chunk, as a DataLoader's from its first batch."""
    from essp.dataplane.plan import chunk_size

    if not plan.jobs:
        return 1
    return min(chunk_size(settings, plan.jobs[0].max_inflight, len(plan.jobs)), len(plan.jobs))


def expected_shape(stream: str, length: int, size: int) -> tuple[int, ...]:
    return (3, size, size) if stream == "rgb" else (2 * length, size, size)


def drain(stream: SampleStream, plan: EpochPlan, expect: tuple[int, ...], step_s: float = 0.0,
          timeout_s: float = 180.0) -> dict[str, Any]:
    """Take every sample of the plan's (published) epoch from ``stream``: arrival times, the sample ids, and
    the data wait after the first sample; ``step_s`` simulates a trainer's step per sample."""
    samples = stream.epoch(plan.epoch, len(plan.jobs), timeout_s=timeout_s)
    arrivals: list[float] = []
    ids: list[str] = []
    waited = 0.0  # after the first sample: the trainer's data wait
    while True:
        asked = time.perf_counter()
        sample = next(samples, None)
        got = time.perf_counter()
        if sample is None:
            break
        if sample.array.shape != expect or sample.array.dtype != np.uint8:
            raise RuntimeError(f"sample {sample.sample_id} of stream {stream.stream}: {sample.array.shape} "
                               f"{sample.array.dtype}, expected {expect} uint8")
        if arrivals:
            waited += got - asked
        arrivals.append(got)
        ids.append(sample.sample_id)
        if step_s:
            time.sleep(step_s)
    return {"arrivals": arrivals, "ids": ids, "waited_s": waited}


def rate(published: float, arrivals: list[float], unit: int) -> dict[str, Any]:
    """Samples/s after the first delivery unit (a chunk: the samples that travel together) arrived, as a
    DataLoader's after its first batch, and samples/s from publishing the epoch."""
    times = sorted(arrivals)
    count = len(times)
    unit = min(unit, count - 1) if count > 1 else 0
    span = times[-1] - times[unit - 1] if unit else 0.0
    return {"samples": count, "first_sample_s": times[0] - published if times else None,
            "first_unit_at": times[unit - 1] if unit else None, "last_at": times[-1] if times else None,
            "span_s": span, "counted": count - unit, "samples_per_s": (count - unit) / span if span else None,
            "delivery_unit": unit,
            "samples_per_s_from_start": count / (times[-1] - published) if times and times[-1] > published else None}


def _consume(settings: Settings, stream: SampleStream, plan: EpochPlan, step_s: float) -> dict[str, Any]:
    """Publish the plan and drain its epoch from one stream."""
    from essp.dataplane.plan import publish_plan

    job = plan.jobs[0]
    published = time.perf_counter()
    publish_plan(settings, plan)
    got = drain(stream, plan, expected_shape(stream.stream, job.length, job.height), step_s)
    out = rate(published, got["arrivals"], delivery_unit(settings, plan))
    out["wait_fraction"] = got["waited_s"] / out["span_s"] if out["span_s"] else None
    out["step_ms"] = step_s * 1000
    out["all_delivered"] = sorted(got["ids"]) == sorted(plan.sample_ids())
    return out


def redis_persistence(settings: Settings) -> str:
    from essp.clients.redis import redis_client

    try:
        client = redis_client(settings)
        save = client.config_get("save").get("save", "")
        aof = client.config_get("appendonly").get("appendonly", "no")
    except Exception as exc:  # noqa: BLE001 - a managed Redis may refuse CONFIG
        return f"unknown ({type(exc).__name__})"
    return f"save={save!r}, appendonly={aof}"


def start_workers(settings: Settings, workers: list[LocalProcess], kinds: dict[str, int], log_dir: Path) -> float:
    """Bring the pool to ``kinds[kind]`` workers of each kind (decode, flow, rgb; their state folder: the
    parent of `log_dir`); returns the seconds until all serve."""
    started = time.perf_counter()
    have = {w.name for w in workers}
    commands = [(worker_name(kind, index), worker_args(kind)) for kind, count in kinds.items()
                for index in range(count) if worker_name(kind, index) not in have]
    workers += LocalProcesses(settings, state_dir=log_dir.parent).start(commands)
    return time.perf_counter() - started


def worker_roles(workers: list[LocalProcess]) -> dict[str, str]:
    """Worker name -> its kind (decode, flow, rgb), the role its CPU is reported under."""
    roles = {}
    for worker in workers:
        for kind in ("decode", "flow", "rgb"):
            if worker.name.startswith(worker_name(kind, 0)[:-1]):
                roles[worker.name] = kind
    return roles


def process_roles(workers: list[LocalProcess], services: dict[str, list[int]]) -> dict[str, list[int]]:
    """PIDs by role: each worker kind, the consumer (this process), the local services."""
    roles = worker_roles(workers)
    by_role: dict[str, list[int]] = {}
    for worker in workers:
        by_role.setdefault(roles[worker.name], []).append(worker.pid)
    return {**by_role, "consumer (bench)": [os.getpid()], **services}


class EpochMeter:
    """CPU of every process over one drained epoch, and the workers' work counters from the heartbeat
    snapshots around it (the snapshot after one epoch is the one before the next)."""

    def __init__(self, settings: Settings, workers: list[LocalProcess], services: dict[str, list[int]]) -> None:
        self.settings, self.workers, self.services = settings, workers, services
        self.names = [w.name for w in workers]
        self.timeout_s = 4 * settings.heartbeat_s + 5
        self.before = fresh_snapshot(settings, self.names, timeout_s=self.timeout_s, settle_s=SETTLE_S)

    def measure(self, run_epoch: Callable[[], dict[str, Any]], samples_of: Callable[[dict[str, Any]], int]
                ) -> dict[str, Any]:
        """Run one epoch (``run_epoch`` publishes and drains it) and split its CPU per delivered sample."""
        meter = ProcessMeter(process_roles(self.workers, self.services))
        result = run_epoch()
        cpu_s = {role: d["cpu_s"] for role, d in meter.deltas().items()}
        after = fresh_snapshot(self.settings, self.names, timeout_s=self.timeout_s, since=self.before,
                               settle_s=SETTLE_S)
        deltas = counter_deltas(self.before, after)
        self.before = after
        work_s = work_by_role(deltas, worker_roles(self.workers))
        result.update({"cpu_s": cpu_s, "work_cpu_s": work_s, "worker_counters": deltas,
                       "cpu": cpu_split(cpu_s, work_s, samples_of(result))})
        return result


def _one_stream_row(settings: Settings, manifest: Manifest, options: BenchOptions, run: str,
                    workers: list[LocalProcess], services: dict[str, list[int]], step_s: float | None,
                    say: Say) -> tuple[dict[str, Any], float]:
    """Warm-up, ``options.epochs`` drained epochs measured one by one, then one epoch at a trainer's pace."""
    from essp.dataplane.consumer import SampleStream

    with SampleStream(settings, run, "flow", prefetch=options.prefetch) as stream:
        time.sleep(4.0)  # the consumer joins its group; the warm-up epoch absorbs the rest
        warm = _consume(settings, stream, _plan(manifest, run, 0, options.warmup_samples, options), 0.0)
        meter = EpochMeter(settings, workers, services)
        epochs = []
        for epoch in range(1, options.epochs + 1):
            plan = _plan(manifest, run, epoch, options.pipeline_samples, options)
            epochs.append(meter.measure(lambda p=plan: _consume(settings, stream, p, 0.0), lambda r: r["samples"]))
            epochs[-1]["epoch"] = epoch
            say(f"streaming epoch {epoch}: {epochs[-1]['samples_per_s'] or 0:.1f} samples/s, broker "
                f"{epochs[-1]['cpu']['broker_ms_per_sample']:.1f} ms CPU/sample")
        if step_s is None:  # a trainer that asks for 80% of what the plane gives
            rates = [e["samples_per_s"] for e in epochs if e["samples_per_s"]]
            step_s = 1 / (0.8 * sum(rates) / len(rates)) if rates else 0.0
        paced = (_consume(settings, stream, _plan(manifest, run, options.epochs + 1, options.paced_samples, options),
                          step_s) if options.paced_samples > 1 else None)
        stats = stream.stats
    return {"warmup": warm, "epochs": epochs, "paced": paced, "dead": stats.dead, "redone": stats.redone}, step_s


def _combine(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The measured epochs together: rate over their summed spans, CPU split over all their samples."""
    counted = sum(e["counted"] for e in epochs if e["span_s"])
    span = sum(e["span_s"] for e in epochs if e["span_s"])
    samples = sum(e["samples"] for e in epochs)
    cpu = cpu_split(sum_seconds([e["cpu_s"] for e in epochs]), sum_seconds([e["work_cpu_s"] for e in epochs]),
                    samples)
    decode = [c for e in epochs for name, c in e["worker_counters"].items() if name.startswith("worker-decode-")]
    used = sum(c.get("frames", 0) for c in decode)
    decoded = sum(c.get("frames_decoded", 0) for c in decode)
    return {"samples_per_s": counted / span if span else None, "measured_samples": samples, "cpu": cpu,
            "decoded_per_used": decoded / used if used and decoded else None}


def measure_streaming(settings: Settings, manifest: Manifest, options: BenchOptions, tag: str, log_dir: Path,
                      say: Say, *, after_first: Callable[[list[LocalProcess]], None] | None = None
                      ) -> list[dict[str, Any]]:
    """Samples/s, CPU split, broker cost per epoch, data wait and disk writes of the one-stream plane with
    1, 2, ... workers of each kind (decode, flow). ``after_first`` runs with the pool of the first worker
    count still up (the two-stream measurement adds its rgb workers there); disk writes are counted over
    the workers' start and the one-stream epochs."""
    from essp.clients.kafka import ensure_topics
    from essp.contract import Topics
    from essp.dataplane.payloads import SampleStore

    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, [topics.control, topics.events, topics.dead])
    size, length = options.pipeline_size, options.length
    workers: list[LocalProcess] = []
    step_s = None if options.trainer_step_ms is None else options.trainer_step_ms / 1000
    rows = []
    try:
        for position, count in enumerate(sorted(set(options.workers))):
            services = service_pids()
            meter = ProcessMeter({"bench": [os.getpid()], **{w.name: [w.pid] for w in workers}, **services})
            log_before = sum(p.stat().st_size for p in log_dir.glob("*.log"))
            startup_s = start_workers(settings, workers, {"decode": count, "flow": count}, log_dir)
            run = f"bench-{tag}-w{count}"
            say(f"streaming: {count} decode + {count} flow worker(s) serving after {startup_s:.1f}s; run {run}")
            row, step_s = _one_stream_row(settings, manifest, options, run, workers, services, step_s, say)
            left_in_redis = SampleStore(settings, run).payload_bytes()
            disk = {role: d["write_bytes"] for role, d in
                    meter.deltas({"bench": [os.getpid()], **{w.name: [w.pid] for w in workers}, **services}).items()}
            logs = sum(p.stat().st_size for p in log_dir.glob("*.log")) - log_before
            epochs, paced = row["epochs"], row["paced"]
            delivered = (row["warmup"]["samples"] + sum(e["samples"] for e in epochs)
                         + (paced["samples"] if paced else 0))
            plane = {role: disk[role] for role in ["bench", *(w.name for w in workers)]}
            combined = _combine(epochs)
            from essp.dataplane.extractors import frames_format

            channels = 1 if frames_format({"flow": {}}) == "gray" else 3  # the frames the decode worker stores
            frame_bytes = (length + 1) * size * size * channels
            raw_per_sample = {"frames": frame_bytes, "flow": 2 * length * size * size}
            rows.append({
                **row, "workers_per_kind": count, "processes": 2 * count, "size": size,
                "method": options.pipeline_method, "startup_s": startup_s, "run": run,
                "samples_per_s": combined["samples_per_s"],
                "flow_frames_per_s": combined["samples_per_s"] * length if combined["samples_per_s"] else None,
                "first_sample_s": epochs[0]["first_sample_s"], "measured_samples": combined["measured_samples"],
                "decoded_per_used": combined["decoded_per_used"],
                "cpu": combined["cpu"], "cpu_ms_per_sample": combined["cpu"]["cpu_ms_per_sample"],
                "overhead_ms_per_sample": combined["cpu"]["overhead_ms_per_sample"],
                "broker_ms_per_sample_by_epoch": [e["cpu"]["broker_ms_per_sample"] for e in epochs],
                "all_delivered": all(e["all_delivered"] for e in epochs), "delivered": delivered,
                "disk_bytes": sum(v or 0 for v in plane.values()), "disk_bytes_by_process": plane,
                "worker_log_bytes": logs, "disk_bytes_services": {role: disk[role] for role in services},
                "redis_persistence": redis_persistence(settings),
                "raw_bytes_delivered": delivered * (raw_per_sample["frames"] + raw_per_sample["flow"]),
                "raw_bytes_per_sample": raw_per_sample, "payload_bytes_left_in_redis": left_in_redis,
            })
            say(f"streaming: {combined['samples_per_s'] or 0:.1f} samples/s over {len(epochs)} epochs, disk "
                f"{rows[-1]['disk_bytes']} B (logs {logs} B), data wait at {(step_s or 0) * 1000:.0f} ms/step: "
                f"{(paced or {}).get('wait_fraction') or 0:.1%}")
            if position == 0 and after_first is not None:
                after_first(workers)
    finally:
        stoppers = [threading.Thread(target=w.stop) for w in workers]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
    return rows
