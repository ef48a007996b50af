"""`essp demo` / `make demo`: the main job, end to end, on the embedded default.

Starts (or reuses) the local stack, creates buckets and topics, migrates Airflow's metadata DB and
runs the `essp_smoke` DAG through Airflow, every task through the stage operator as a local
process, then streams one epoch of a synthetic dataset through the data plane (resident decode,
flow and RGB workers as local processes, samples consumed from Redis as a trainer would) and prints
a summary. Later stages of the project extend this to the training run.
"""

from __future__ import annotations

import json
import threading
import time

from rich.console import Console

from essp.airflow_stack import airflow_cli, airflow_env, migrate
from essp.clients.kafka import delete_topics
from essp.consumer import SampleStream
from essp.contract import Topics
from essp.errors import EsspError
from essp.infra import LocalStack, init_resources, prepare_settings
from essp.ingest import ingest_directory
from essp.localworkers import start_workers
from essp.payloads import SampleStore
from essp.plan import plan_epoch, publish_plan
from essp.settings import Settings
from essp.synth import synthesize

DEMO_DAG = "essp_smoke"


def run_demo(out: Console) -> dict:
    start = time.monotonic()
    settings = prepare_settings()
    out.rule("1/4 local stack")
    for status in LocalStack(settings, log=out.print).up():
        out.print(f"  {status.name:<9} {status.address:<22} {status.action}")
    made = init_resources(settings)
    out.print(f"  buckets {', '.join(made['buckets'])}; topics {', '.join(made['topics'])}")
    out.rule("2/4 Airflow metadata DB")
    env = airflow_env(settings)
    migrate(settings, env)
    out.print(f"  migrated {settings.pg_database} on {settings.pg_host}:{settings.pg_port}")
    out.rule(f"3/4 DAG {DEMO_DAG} (airflow dags test)")
    done = airflow_cli(settings, "dags", "test", DEMO_DAG, env=env, timeout=1800)
    summary = None
    for line in (done.stdout + done.stderr).splitlines():
        if "ESSP_SUMMARY " in line:
            summary = json.loads(line.split("ESSP_SUMMARY ", 1)[1].split("  ", 1)[0].strip())
    if summary is None:
        raise EsspError(f"DAG {DEMO_DAG} finished but printed no summary; see `essp airflow test {DEMO_DAG}`")
    for service, ms in summary.items():
        out.print(f"  {service:<6} round trip through Airflow stage: {ms:8.2f} ms")
    out.rule("4/4 one epoch through the streaming data plane")
    epoch = run_dataplane_epoch(settings, out)
    out.rule("success")
    out.print(f"  {DEMO_DAG} and a streamed epoch succeeded in {time.monotonic() - start:.1f} s. "
              f"Airflow UI: `essp airflow up`, then {settings.airflow_url}")
    return {**summary, "dataplane": epoch}


def run_dataplane_epoch(settings: Settings, out: Console, *, samples: int | None = None) -> dict:
    """Synthesise (once) and ingest a small dataset, start one decode, one flow and one RGB worker,
    plan an epoch and consume both streams; stop the workers and clean the run up."""
    root = settings.state_dir / "datasets" / "synth-demo"
    if not (root / "classInd.txt").exists():
        synthesize(root, classes=6, videos_per_class=8, frames=48, height=128, width=128, seed=0)
    manifest, uri = ingest_directory(settings, root, "synth-demo")
    out.print(f"  dataset {manifest.name} v{manifest.version}: {len(manifest.videos)} videos, "
              f"{len(manifest.classes)} classes ({uri})")
    run = f"demo-{int(time.time())}"
    features = {"rgb": {}, "flow": {"method": "dis_fast"}}
    workers = start_workers(settings, settings.state_dir / "logs" / "demo-workers", [
        ("demo-decode", ["decode"]), ("demo-flow", ["extract", "--kind", "flow"]),
        ("demo-rgb", ["extract", "--kind", "rgb"]),
    ])
    try:
        plan = plan_epoch(manifest, run=run, epoch=0, features=features, length=10, height=112, width=112,
                          samples=samples)
        results: dict[str, dict] = {}
        errors: list[BaseException] = []

        def drain(stream: str) -> None:
            try:
                with SampleStream(settings, run, stream) as source:
                    shapes = {tuple(s.array.shape) for s in source.epoch(0, len(plan.jobs), timeout_s=120)}
                    results[stream] = {"delivered": source.stats.delivered, "dead": source.stats.dead,
                                       "waited_s": round(source.stats.waited_s, 2), "shape": sorted(shapes)}
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=drain, args=(stream,)) for stream in features]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        publish_plan(settings, plan)
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        if errors:
            raise errors[0]
    finally:
        codes = {w.name: w.stop() for w in workers}
        SampleStore(settings, run).clear()
        delete_topics(settings, Topics(settings.topic_prefix).run_topics(run, list(features)))
    for stream, figures in results.items():
        out.print(f"  {stream:<5} {figures['delivered']} samples {figures['shape']} uint8, {figures['dead']} dead, "
                  f"consumer waited {figures['waited_s']} s")
    out.print(f"  epoch of {len(plan.jobs)} samples (L=10, 112x112) in {elapsed:.1f} s "
              f"({len(plan.jobs) / elapsed:.1f} samples/s with 1 decode + 1 flow + 1 rgb worker); "
              f"workers exited {codes}")
    if any(codes.values()):
        raise EsspError(f"a worker did not stop cleanly: {codes}; logs in {settings.state_dir / 'logs'}")
    return {"samples": len(plan.jobs), "seconds": round(elapsed, 2), **{s: r["delivered"] for s, r in results.items()}}
