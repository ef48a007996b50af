"""`essp worker ...`, `essp plan`, `essp consume` and `essp control ...`: the data plane by hand."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from essp.settings import Settings

worker_app = typer.Typer(help="Resident workers of the data plane (one process each, or --replicas N).",
                         no_args_is_help=True)
control_app = typer.Typer(help="Pause, resume or stop workers or one run (every worker obeys).",
                          no_args_is_help=True)
out = Console()
err = Console(stderr=True)

Replicas = Annotated[int, typer.Option(min=1, help="Start N worker processes and supervise them.")]
RunFilter = Annotated[str | None, typer.Option(help="Serve only this run (default: every run).")]
WorkerId = Annotated[str | None, typer.Option(help="Id in events and control targets (default: kind-host-pid).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log every job.")]


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("kafka.coordinator").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("redis").setLevel(logging.WARNING)


def exit_served(code: int = 0) -> NoReturn:
    """End a resident process that has stopped cleanly (its producers flushed and closed, its state,
    events and checkpoints written) without the interpreter's teardown: with torch loaded, destructors
    took 1-2 s of every trainer's stop, and a run waits for its trainers to stop before it scores."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def supervise(commands: list[tuple[list[str], dict[str, str] | None]]) -> None:
    """:func:`essp.deploy.local.supervise`, exiting with the worst exit status of the children."""
    from essp.deploy.local import supervise as run_children

    code = run_children(commands)
    if code:
        raise typer.Exit(code)


def _supervise(argv: list[str], replicas: int, name: str) -> None:
    """Run ``replicas`` copies of this worker command as child processes."""
    supervise([([*argv, "--replicas", "1", "--worker-id", f"{name}-{os.getpid()}-{i}"], None)
               for i in range(replicas)])


@worker_app.command("decode")
def decode_cmd(replicas: Replicas = 1, run: RunFilter = None, worker_id: WorkerId = None,
               verbose: Verbose = False) -> None:
    """Decode worker: DecodeChunk -> each sample's frames in Redis + one FramesReady per chunk."""
    if replicas > 1:
        _supervise(["worker", "decode", *(["--run", run] if run else [])], replicas, "decode")
        return
    from essp.dataplane.resident import limit_threads

    limit_threads()
    _logging(verbose)
    from essp.dataplane.decode import DecodeWorker

    counters = DecodeWorker(Settings(), worker_id=worker_id, run=run).serve()
    err.print(f"decode worker stopped: {json.dumps(counters)}")
    exit_served()


@worker_app.command("extract")
def extract_cmd(kind: Annotated[str, typer.Option(help="Extractor kind (= stream): rgb, flow, framediff, ...")],
                replicas: Replicas = 1, run: RunFilter = None, worker_id: WorkerId = None,
                verbose: Verbose = False) -> None:
    """Extractor worker: FramesReady -> each sample's feature in Redis + one FeatureReady on its stream.
    The extractor's options (e.g. the flow method) come with each job, from the plan."""
    from essp.dataplane.extractors import extractor_kinds, load_extractor_plugins

    settings = Settings()
    load_extractor_plugins([m for m in settings.extractor_modules.split(",") if m.strip()])
    if kind not in extractor_kinds():
        raise typer.BadParameter(f"unknown extractor kind {kind!r}; registered: {', '.join(extractor_kinds())}",
                                 param_hint="--kind")
    if replicas > 1:
        _supervise(["worker", "extract", "--kind", kind, *(["--run", run] if run else [])], replicas, kind)
        return
    from essp.dataplane.resident import limit_threads

    limit_threads()
    _logging(verbose)
    from essp.dataplane.extract import ExtractWorker

    counters = ExtractWorker(settings, kind, worker_id=worker_id, run=run).serve()
    err.print(f"{kind} worker stopped: {json.dumps(counters)}")
    exit_served()


@worker_app.command("status")
def status_cmd() -> None:
    """Live workers (those whose heartbeat has not expired) with their counters."""
    from essp.clients.redis import check_redis
    from essp.contract import RedisKeys, WorkerEvent

    settings = Settings()
    client = check_redis(settings)
    table = Table("worker", "kind", "last event", "jobs", "failures", "busy s", "waited s")
    for key in sorted(client.scan_iter(match=RedisKeys(settings.redis_prefix).workers(), count=1000)):
        raw = client.get(key)
        if not raw:
            continue
        event = WorkerEvent.model_validate_json(raw)
        c = event.counters
        table.add_row(event.worker_id, event.worker_kind, f"{event.event} {time.time() - event.sent_at:.0f}s ago",
                      f"{c.get('jobs_done', 0):.0f}", f"{c.get('failures', 0):.0f}", f"{c.get('busy_s', 0):.1f}",
                      f"{c.get('waited_s', 0):.1f}")
    out.print(table)


def plan_cmd(
    manifest: Annotated[str, typer.Option(help="Manifest: dataset name (latest), name@VERSION or s3:// URI.")],
    run: Annotated[str, typer.Option(help="Run id.")],
    epoch: Annotated[int, typer.Option(min=0)] = 0,
    features: Annotated[str, typer.Option(help="Streams and options, e.g. rgb,flow:method=dis_fast.")] = "rgb,flow",
    length: Annotated[int, typer.Option(min=1, help="Stack length L (L+1 frames per sample).")] = 10,
    size: Annotated[str, typer.Option(help="Target HEIGHTxWIDTH, or one number for a square.")] = "112",
    samples: Annotated[int | None, typer.Option(min=1, help="Samples (default: one per video).")] = None,
    seed: int = 0,
    max_inflight: Annotated[int | None, typer.Option(min=1, help="Bound on samples in flight.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish the jobs (else only print the plan).")] = True,
) -> None:
    """Plan one epoch (seeded by run and epoch) and publish its decode jobs."""
    from essp.dataplane.plan import PlanError, parse_features, plan_epoch, publish_plan, record_decode_quarantine
    from essp.datasets.manifest import ManifestStore

    settings = Settings()
    try:
        height, width = _size(size)
        spec = parse_features(features)
    except (PlanError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    loaded = ManifestStore(settings).load(manifest)
    # Videos that failed to decode in earlier epochs of this run: quarantine them in a new manifest
    # version, so this epoch (and later runs) skip them.
    loaded, new_uri = record_decode_quarantine(settings, loaded, run)
    if new_uri:
        err.print(f"quarantined {len(loaded.quarantined)} video(s) in {new_uri}")
    try:
        plan = plan_epoch(loaded, run=run, epoch=epoch, features=spec, length=length, height=height, width=width,
                          samples=samples, seed=seed, max_inflight=max_inflight or settings.max_inflight)
    except (PlanError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    published = publish_plan(settings, plan) if publish else 0
    per_class = {loaded.classes[k]: v for k, v in sorted(plan.class_counts().items())}
    out.print(json.dumps({"run": run, "epoch": epoch, "jobs": len(plan.jobs), "published": published,
                          "streams": plan.streams, "per_class": per_class}))


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--size {text!r} must be HEIGHTxWIDTH or one number") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 8:
        raise ValueError(f"--size {text!r} must be HEIGHTxWIDTH with both at least 8")
    return dims[0], dims[1]


def consume_cmd(
    run: Annotated[str, typer.Option(help="Run id.")],
    stream: Annotated[str, typer.Option(help="Stream (extractor kind) to read.")],
    epoch: Annotated[int, typer.Option(min=0)] = 0,
    expected: Annotated[int, typer.Option(min=1, help="Samples planned for the epoch.")] = 1,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds without a sample.")] = 120.0,
) -> None:
    """Drain one stream of one epoch (what a trainer does) and print what arrived."""
    from essp.dataplane.consumer import SampleStream

    started = time.monotonic()
    shapes: set[tuple[int, ...]] = set()
    with SampleStream(Settings(), run, stream) as samples:
        for sample in samples.epoch(epoch, expected, timeout_s=timeout):
            shapes.add(tuple(sample.array.shape))
        stats = samples.stats
    elapsed = time.monotonic() - started
    out.print(json.dumps({"delivered": stats.delivered, "dead": stats.dead, "duplicates": stats.duplicates,
                          "redone": stats.redone, "seconds": round(elapsed, 2),
                          "samples_per_s": round(stats.delivered / elapsed, 2) if elapsed else None,
                          "waited_s": round(stats.waited_s, 2), "shapes": sorted(shapes),
                          "dead_reasons": stats.dead_reasons}))


def _control(command: str, run: str | None, target: str) -> None:
    from essp.dataplane.resident import publish_control
    from essp.lifecycle.liveness import observe_pause

    settings = Settings()
    message = publish_control(settings, command, run=run, target=target)
    if run:  # the pause starts (or ends) in the run's pause ledger now, as the essp_control DAG's does, even
        observe_pause(settings, run)  # when no epoch wait (a triggerer) is there to see it
    out.print(f"sent {message.command} to {message.target}" + (f" for run {run}" if run else ""))


ControlRun = Annotated[str | None, typer.Option(help="Apply to this run only (its state is kept in Redis).")]
Target = Annotated[str, typer.Option(help="'*', a worker family (decode, extract), a kind (flow) or a worker id.")]


@control_app.command("pause")
def pause_cmd(run: ControlRun = None, target: Target = "*") -> None:
    """Hold jobs (they wait in Kafka; nothing is lost)."""
    _control("pause", run, target)


@control_app.command("resume")
def resume_cmd(run: ControlRun = None, target: Target = "*") -> None:
    _control("resume", run, target)


@control_app.command("stop")
def stop_cmd(run: ControlRun = None, target: Target = "*") -> None:
    """With --run: drop the run's remaining jobs. Without: the targeted workers exit cleanly."""
    _control("stop", run, target)
