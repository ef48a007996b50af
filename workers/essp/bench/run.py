"""One whole `essp bench dataplane` run: what the streaming data plane costs and delivers, next to
the usual ways.

One run measures, on the same synthetic dataset (H.264 at 320x240, so that resizing to the target
size is real work) and the same sampled segments:

1. **Per core**: one process with OpenCV, FFmpeg and BLAS held to one thread decodes L+1 frames at
   the target size from video bytes in memory (as the decode worker does for the flow stream), then
   computes the L flow fields of the stack with each flow method. Rates are per CPU-second of that
   process, set against the paper's 0.04 s per flow frame on one core; at the pipeline's size and
   method they give the machine's limit (decode + flow alone on the usable cores).
2. **Baselines** (:mod:`essp.bench.baselines`, :mod:`essp.bench.classic`): a torch DataLoader running the
   workers' lean functions, one written as a user would (PyAV + OpenCV frame by frame), two DataLoaders
   (one per stream) for the two-stream comparison, and the classic pipeline that writes frames and flow
   to disk first.
3. **Streaming** (:mod:`essp.bench.streaming`): real `essp worker decode` and `essp worker extract --kind
   flow` processes serve several drained epochs that a :class:`~essp.dataplane.consumer.SampleStream` in
   this process takes: samples/s, CPU per sample of every process (services included) split into work
   and overhead (:mod:`essp.bench.accounting`), the broker's cost per epoch, the data wait, disk writes.
4. **Two streams** (:mod:`essp.bench.twostreams`): an rgb extractor joins the pool and one decode feeds
   the rgb and flow streams of one plan, drained by two SampleStreams at once.

The ratios of the plane against its baselines (:mod:`essp.bench.ratios`) and everything else are
printed in one table and returned (and optionally written) as JSON; ``--write-docs`` puts the figures
into docs/benchmarks.md between the ``bench:dataplane`` markers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from essp.bench.baselines import measure_dataloader, measure_two_dataloaders
from essp.bench.classic import measure_classic
from essp.bench.docs import DEFAULT_DOCS, update_docs
from essp.bench.options import PAPER_S_PER_FRAME, TARGET_SPEEDUP, BenchOptions
from essp.bench.percore import _per_core_in_child, find_real_clip
from essp.bench.processes import MemoryBroker, machine_info
from essp.bench.report import details, render_markdown, result_table, summarise
from essp.bench.streaming import _isolated, _plan, cleanup, measure_streaming
from essp.bench.twostreams import measure_two_streams, two_stream_plan
from essp.settings import Settings


def _canonical_command(options: BenchOptions) -> str:
    if options.quick:
        return "essp bench dataplane --quick" + (f" --broker {options.broker}" if options.broker != "local" else "")
    default = BenchOptions()
    args = ["essp", "bench", "dataplane"]
    flags = {"sizes": "--sizes", "methods": "--methods", "length": "--length", "samples": "--samples",
             "tvl1_samples": "--tvl1-samples", "pipeline_samples": "--pipeline-samples", "workers": "--workers",
             "epochs": "--epochs", "videos_per_class": "--videos-per-class", "classes": "--classes",
             "frames": "--frames", "trainer_step_ms": "--trainer-step-ms"}
    for name, flag in flags.items():
        value = getattr(options, name)
        if value != getattr(default, name):
            args += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    if options.broker != default.broker:
        args += ["--broker", options.broker]
    for name, flag in (("real_clip", "--no-real-clip"), ("two_streams", "--no-two-streams"),
                       ("user_baseline", "--no-user-baseline")):
        if not getattr(options, name):
            args.append(flag)
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
    if write_docs and options.broker != "local":
        raise ValueError(f"the docs' block holds the local stack's figures, not --broker {options.broker}'s")
    tag = "bench" + uuid.uuid4().hex[:8]
    own_scratch = scratch is None
    scratch = Path(scratch or tempfile.mkdtemp(prefix="essp-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    broker = contextlib.ExitStack()  # closed in the finally below
    if options.broker == "memory":
        try:
            port = broker.enter_context(MemoryBroker(scratch / "tansu-memory.log"))
        except BaseException:
            if own_scratch and not keep:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        settings = settings.model_copy(update={"kafka_port": port})
        say(f"broker: a Tansu of the bench's own keeping its log in memory, on port {port}")
    isolated = _isolated(settings, tag, options.heartbeat_s)
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
        "broker": {"local": f"the local stack's Tansu, its log in S3 (bucket {settings.kafka_storage_bucket})",
                   "memory": "a Tansu of the bench's own, its log in memory"}[options.broker],
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
        two_plan = two_stream_plan(manifest, tag, 1, options.pipeline_samples, options)

        # The baselines fork their processes: run them before the streaming part starts threads here.
        result["dataloader"] = []
        for count in counts:
            say(f"torch DataLoader, lean: num_workers={2 * count} (= {count} decode + {count} flow processes)")
            result["dataloader"].append(measure_dataloader(videos, plans[count], options, 2 * count))
        if options.user_baseline:
            say(f"torch DataLoader written as a user would: num_workers={2 * counts[0]}")
            result["dataloader_user"] = measure_dataloader(videos, plans[counts[0]], options, 2 * counts[0],
                                                           style="user")
        if options.two_streams:
            say(f"two torch DataLoaders, one per stream (rgb num_workers={counts[0]}, flow num_workers="
                f"{2 * counts[0]}), concurrently")
            result["two_dataloaders"] = measure_two_dataloaders(videos, two_plan, options, counts[0])
        say(f"classic: frames and flow to disk with {2 * counts[0]} processes, then read back")
        result["classic"] = measure_classic(videos, manifest, plans[counts[0]], options, 2 * counts[0], scratch)

        log_dir = scratch / "logs"
        log_dir.mkdir(exist_ok=True)

        def two_streams(workers: list) -> None:
            result["two_streams"] = measure_two_streams(isolated, manifest, options, tag, log_dir, workers, say)

        result["streaming"] = measure_streaming(isolated, manifest, options, tag, log_dir, say,
                                                after_first=two_streams if options.two_streams else None)
    finally:
        try:
            cleanup(isolated)
        except Exception as exc:  # noqa: BLE001 - report, never mask the benchmark's own error
            say(f"cleanup of {tag} failed: {exc}")
        broker.close()
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
