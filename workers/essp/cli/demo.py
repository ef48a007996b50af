"""`essp demo` / `make demo`: the main job, end to end, on the embedded default.

Starts (or reuses) the local stack, creates buckets and topics, migrates Airflow's metadata DB and
runs the `essp_smoke` DAG through Airflow (every task through the stage operator as a local
process), then runs the `essp_train` DAG through Airflow (`airflow dags test`) on a synthetic
dataset: the ensure step starts resident decode, flow and RGB workers and one resident trainer per
stream as local processes, each stream's task defers while its trainer trains each epoch (planned to
Kafka, trained from Redis), every test video is scored with 25 snippets per stream, every fusion
strategy compared, the report and the model registered in S3; the report's summary is printed and
one test video predicted with the registered model. The figures are in docs/results.md.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time

from rich.console import Console

from essp.clients.s3 import ObjectStore, S3Uri
from essp.datasets.ingest import ingest_directory
from essp.datasets.manifest import ManifestStore
from essp.datasets.synth import synthesize
from essp.errors import EsspError
from essp.evaluation.report import report_uri
from essp.lifecycle.model_registry import ModelRegistry
from essp.lifecycle.predict import predict_videos
from essp.settings import Settings
from essp.stack.airflow import airflow_cli, airflow_env, migrate
from essp.stack.services import LocalStack, init_resources, prepare_settings, venv_binary

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
    out.rule(f"4/4 DAG {TRAIN_DAG}: two-stream training through the streaming data plane (airflow dags test)")
    training = run_demo_training(settings, out, env=env)
    out.rule("success")
    out.print(f"  {DEMO_DAG} and {TRAIN_DAG} (run {training['run']}) succeeded in {time.monotonic() - start:.1f} s.")
    out.print("  The Airflow UI with the run's report tab, and the same run triggered with another fusion:\n"
              "    .venv/bin/essp airflow up && .venv/bin/essp airflow trigger essp_train --demo --set fusion=max "
              f"--wait\n  then open {settings.airflow_url} (login: `essp airflow login`).")
    return {**summary, "training": training}


# The demo's dataset and run: 4 motion classes, 16 clips each (8 scene groups, 2 held out for test),
# 48 frames at 112x112; L=10 flow stacks; small enough for a 2-core CPU in a few minutes.
SYNTH_GENERATOR = 2  # bump when essp.datasets.synth renders differently: the demo regenerates its dataset
DEMO_DATASET = {"classes": 4, "videos_per_class": 16, "frames": 48, "height": 112, "width": 112, "seed": 0}
DEMO_NAME = "synth-demo"
# essp_train's params for the demo (docs/results.md has its figures). Weighted 1:2 for flow: two-stream
# practice weighs the temporal stream higher, and on this data the RGB stream (trained from scratch on
# a few dozen clips) is the less reliable one. One worker of each kind: the demo machine has 2 cores;
# they stop when the run ends (a demo leaves no process behind).
DEMO_CONF = {"dataset": DEMO_NAME, "rgb_arch": "tiny", "flow_arch": "tiny", "epochs": 10, "samples_per_epoch": 128,
             "length": 10, "size": 112, "batch_size": 16, "lr": 0.02, "snippets": 25, "fusion": "weighted",
             "fusion_weights": {"rgb": 1.0, "flow": 2.0}, "replicas": {"decode": 1, "flow": 1, "rgb": 1},
             "stop_data_workers": True, "registry": DEMO_NAME}
TRAIN_DAG = "essp_train"


def demo_dataset(settings: Settings, out: Console) -> str:
    """Synthesise the demo dataset once (again when the generator changed) and ingest it; its URI."""
    root = settings.state_dir / "datasets" / DEMO_NAME
    marker = root / "essp-demo-dataset.json"
    wanted = json.dumps({**DEMO_DATASET, "generator": SYNTH_GENERATOR}, sort_keys=True)
    if not marker.exists() or marker.read_text() != wanted:  # absent, or made by another version
        shutil.rmtree(root, ignore_errors=True)
        synthesize(root, **DEMO_DATASET)
        marker.write_text(wanted)
    manifest, uri = ingest_directory(settings, root, DEMO_NAME)
    out.print(f"  dataset {manifest.name} v{manifest.version}: {len(manifest.videos)} videos, "
              f"{len(manifest.classes)} classes ({uri})")
    return uri


def run_demo_training(settings: Settings, out: Console, *, env: dict[str, str], **overrides: object) -> dict:
    """The demo dataset, then essp_train through Airflow; prints the report's summary and predicts a test
    video with the registered model."""
    from essp.evaluation.report import read_report, summary_lines

    uri = demo_dataset(settings, out)
    manifest = ManifestStore(settings).load(uri)
    run = f"demo-{int(time.time())}"
    conf = {**DEMO_CONF, **overrides, "dataset": uri, "run": run}
    out.print(f"  airflow dags test {TRAIN_DAG} --conf '{json.dumps(conf)}'")
    started = time.monotonic()
    done = subprocess.run([venv_binary("airflow"), "dags", "test", TRAIN_DAG, "--conf", json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=3600)
    output = done.stdout + done.stderr
    log = settings.state_dir / "logs" / f"demo-{TRAIN_DAG}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(output)
    shown: set[str] = set()
    for line in output.splitlines():  # each stream's epochs with figures, once, as the train tasks logged them
        if "] epoch " in line or line.lstrip().startswith("epoch "):
            text = line.split("] ", 1)[-1] if "] epoch " in line else line
            text = text.split(" [airflow.task")[0].replace("(other stream)", "").strip()
            if " loss " in text and text not in shown:
                shown.add(text)
                out.print("  " + text, soft_wrap=True)
    try:
        report = read_report(settings, run)
    except EsspError:
        tail = "\n".join(output.splitlines()[-40:])
        raise EsspError(f"{TRAIN_DAG} did not finish run {run} (exit {done.returncode}); full output in {log}; "
                        f"its end:\n{tail}") from None
    out.print(f"  {TRAIN_DAG} finished in {time.monotonic() - started:.0f} s; the report's summary:")
    for line in summary_lines(report):
        out.print(f"    {line}")
    production = ModelRegistry(settings, conf["registry"]).production()
    video = sorted(manifest.split("test"), key=lambda v: v.id)[0]
    location = S3Uri.parse(video.uri)
    predicted = predict_videos(settings, [(video.uri, ObjectStore(settings).get_bytes(location.bucket, location.key))],
                               registry=conf["registry"], top=2)
    top = predicted["videos"][0]["top"]
    out.print(f"  essp predict {video.uri}: " + ", ".join(f"{c['class']} {c['score']:.2f}" for c in top)
              + f"  (truth: {video.class_name}; model v{predicted['version']}, fusion {predicted['fusion']}; "
              f"production is v{production.version if production else '-'})")
    out.print(f"  report: {report_uri(settings, run)} (+ plots beside it); Airflow output: {log}")
    return {"run": run, "selected": report["selected"], "top1": report["selected_metrics"]["top1"],
            "summary": report["summary"]}
