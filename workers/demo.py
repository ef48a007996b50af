"""`essp demo` / `make demo`: the main job, end to end, on the embedded default.

Starts (or reuses) the local stack, creates buckets and topics, migrates Airflow's metadata DB and
runs the `essp_smoke` DAG through Airflow (every task through the stage operator as a local
process), then trains a two-stream model on a synthetic dataset through the streaming data plane:
resident decode, flow and RGB workers and one resident trainer per stream as local processes,
epochs planned to Kafka and trained from Redis, every test video scored with 25 snippets per
stream, every fusion strategy compared, the report and the model registered in S3, and one test
video predicted with the registered model. The figures are in docs/results.md.
"""
from __future__ import annotations

import json
import shutil
import time

from rich.console import Console

from essp.airflow_stack import airflow_cli, airflow_env, migrate
from essp.clients.s3 import ObjectStore, S3Uri
from essp.errors import EsspError
from essp.infra import LocalStack, init_resources, prepare_settings
from essp.ingest import ingest_directory
from essp.predict import predict_videos
from essp.settings import Settings
from essp.synth import synthesize
from essp.training import parse_spec, run_training

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
    out.rule("4/4 two-stream training through the streaming data plane")
    training = run_demo_training(settings, out)
    out.rule("success")
    out.print(f"  {DEMO_DAG} and the training run {training['run']} succeeded in {time.monotonic() - start:.1f} s. "
              f"Airflow UI: `essp airflow up`, then {settings.airflow_url}")
    return {**summary, "training": training}


# The demo's dataset and run: 4 motion classes, 16 clips each (8 scene groups, 2 held out for test),
# 48 frames at 112x112; L=10 flow stacks; small enough for a 2-core CPU in a few minutes.
SYNTH_GENERATOR = 2  # bump when essp.synth renders differently: the demo regenerates its dataset
DEMO_DATASET = {"classes": 4, "videos_per_class": 16, "frames": 48, "height": 112, "width": 112, "seed": 0}
DEMO_PARAMS = {"epochs": 10, "samples_per_epoch": 128, "length": 10, "size": 112, "batch_size": 16, "lr": 0.02,
               "snippets": 25, "fusion": "weighted", "fusion_weights": {"rgb": 1.0, "flow": 2.0}}
# Weighted 1:2 for flow: two-stream practice weighs the temporal stream higher, and on this data the
# RGB stream (trained from scratch on a few dozen clips) is the less reliable one (docs/results.md).


def run_demo_training(settings: Settings, out: Console, **overrides: object) -> dict:
    """Synthesise (once) and ingest the demo dataset, train, score, fuse, report, register, predict."""
    root = settings.state_dir / "datasets" / "synth-demo"
    marker = root / "essp-demo-dataset.json"
    wanted = json.dumps({**DEMO_DATASET, "generator": SYNTH_GENERATOR}, sort_keys=True)
    if not marker.exists() or marker.read_text() != wanted:  # absent, or made by another version
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root, **DEMO_DATASET)
        marker.write_text(wanted)
    manifest, uri = ingest_directory(settings, root, "synth-demo")
    out.print(f"  dataset {manifest.name} v{manifest.version}: {len(manifest.videos)} videos, "
              f"{len(manifest.classes)} classes ({uri})")
    spec = parse_spec({**DEMO_PARAMS, **overrides, "manifest": manifest.ref, "run": f"demo-{int(time.time())}"})
    outcome = run_training(settings, spec, log=out.print)
    video = sorted(manifest.split("test"), key=lambda v: v.id)[0]
    location = S3Uri.parse(video.uri)
    predicted = predict_videos(settings, [(video.uri, ObjectStore(settings).get_bytes(location.bucket, location.key))],
                               registry=outcome["registry"]["registry"], top=2)
    top = predicted["videos"][0]["top"]
    out.print(f"  essp predict {video.uri}: " + ", ".join(f"{c['class']} {c['score']:.2f}" for c in top)
              + f"  (truth: {video.class_name}; model v{predicted['version']}, fusion {predicted['fusion']})")
    out.print(f"  report: {outcome['report']['report.json']} (+ plots beside it); timings {outcome['timings']}")
    return {"run": spec.run, "selected": outcome["selected"], "top1": outcome["metrics"]["top1"],
            "summary": outcome["summary"], "timings": outcome["timings"]}


