"""Two streams from one decode: the features rgb + flow of one plan served by 1 decode, 1 flow and 1 rgb
worker (the one-stream pool plus an rgb extractor) and drained by two SampleStreams in this process, one
per stream, concurrently (one thread each). Its rate is the samples of the epoch over the time from the
first arrival on either stream until both have delivered every sample; its CPU is split as the one
stream's (:mod:`essp.bench.accounting`). Compared with two DataLoaders, one per stream, on the same plan
(:func:`essp.bench.baselines.measure_two_dataloaders`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from essp.bench.options import BenchOptions
from essp.bench.processes import service_pids
from essp.bench.streaming import (
    EpochMeter,
    Say,
    _plan,
    delivery_unit,
    drain,
    expected_shape,
    rate,
    start_workers,
)
from essp.deploy.local import LocalProcess, stop_together
from essp.settings import Settings

if TYPE_CHECKING:
    from essp.dataplane.consumer import SampleStream
    from essp.dataplane.plan import EpochPlan
    from essp.datasets.manifest import Manifest

STREAMS = ("rgb", "flow")


def two_stream_features(options: BenchOptions) -> dict[str, dict[str, Any]]:
    """The feature set of the two-stream plan: the RGB frame and the plane's flow."""
    return {"rgb": {}, "flow": {"method": options.pipeline_method}}


def two_stream_plan(manifest: Manifest, tag: str, epoch: int, samples: int, options: BenchOptions) -> EpochPlan:
    """The two-stream run's plan of ``epoch`` (the two DataLoaders get the measured epoch's)."""
    return _plan(manifest, f"bench-{tag}-two", epoch, samples, options, two_stream_features(options))


def _both(settings: Settings, streams: dict[str, SampleStream], plan: EpochPlan) -> dict[str, Any]:
    """Publish the plan once and drain it from every stream at the same time."""
    from essp.dataplane.plan import publish_plan

    job = plan.jobs[0]
    published = time.perf_counter()
    publish_plan(settings, plan)
    got: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def take(name: str) -> None:
        try:
            got[name] = drain(streams[name], plan, expected_shape(name, job.length, job.height))
        except BaseException as exc:  # noqa: BLE001 - raised below, in this thread
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(name,), name=f"bench-drain-{name}") for name in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    unit = delivery_unit(settings, plan)
    planned = sorted(plan.sample_ids())
    per_stream = {name: {**rate(published, g["arrivals"], unit), "all_delivered": sorted(g["ids"]) == planned}
                  for name, g in got.items()}
    # From the first stream to have its first chunk until both have every sample.
    start = min((r["first_unit_at"] for r in per_stream.values() if r["first_unit_at"] is not None), default=None)
    end = max((r["last_at"] for r in per_stream.values() if r["last_at"] is not None), default=None)
    counted = len(planned) - min(unit, len(planned) - 1)
    span = end - start if start is not None and end is not None else 0.0
    return {"streams": per_stream, "samples": len(planned), "span_s": span, "counted": counted,
            "samples_per_s": counted / span if span else None,
            "samples_per_s_from_start": len(planned) / (end - published) if end is not None else None,
            "first_sample_s": min(r["first_sample_s"] for r in per_stream.values()),
            "delivered": {name: g["samples"] for name, g in per_stream.items()},
            "all_delivered": all(g["all_delivered"] for g in per_stream.values()),
            "same_samples": len({tuple(sorted(g["ids"])) for g in got.values()}) == 1}


def measure_two_streams(settings: Settings, manifest: Manifest, options: BenchOptions, tag: str, log_dir: Path,
                        workers: list[LocalProcess], say: Say) -> dict[str, Any]:
    """Add the rgb workers to the one-stream pool (as many as there are flow workers), warm up, drain one
    measured epoch on both streams, and stop the rgb workers again."""
    from essp.dataplane.consumer import SampleStream
    from essp.dataplane.payloads import SampleStore

    count = sum(1 for w in workers if "-flow-" in w.name)
    pool = list(workers)
    startup_s = start_workers(settings, pool, {"rgb": count}, log_dir)
    added = [w for w in pool if w not in workers]
    run = f"bench-{tag}-two"
    say(f"two streams: {count} decode + {count} flow + {count} rgb worker(s), rgb up after {startup_s:.1f}s; run {run}")
    streams: dict[str, SampleStream] = {}
    try:
        for name in STREAMS:
            streams[name] = SampleStream(settings, run, name, prefetch=options.prefetch)
        time.sleep(4.0)  # both consumers join their groups; the warm-up epoch absorbs the rest
        warm = _both(settings, streams, two_stream_plan(manifest, tag, 0, options.warmup_samples, options))
        meter = EpochMeter(settings, pool, service_pids())
        plan = two_stream_plan(manifest, tag, 1, options.pipeline_samples, options)
        result = meter.measure(lambda: _both(settings, streams, plan), lambda r: r["samples"])
        dead = sum(s.stats.dead for s in streams.values())
    finally:
        for stream in streams.values():
            stream.close()
        stop_together(added)
    result.update({"run": run, "workers": {"decode": count, "flow": count, "rgb": count}, "processes": 3 * count,
                   "startup_s": startup_s, "warmup": warm, "dead": dead, "features": two_stream_features(options),
                   "payload_bytes_left_in_redis": SampleStore(settings, run).payload_bytes()})
    say(f"two streams: {result['samples_per_s'] or 0:.1f} samples/s, every sample of both: {result['all_delivered']}")
    return result
