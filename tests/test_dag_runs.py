"""The ESSP DAGs run by Airflow itself (`dag.test()`, a SQLite metadata DB of the module's own) on the
real services: essp_train end to end with a `fusion` override, the nightly retraining skipping and
then retraining after a video was added, essp_predict writing its CSV and JSON, essp_control, and
params refused with the reason.

Each DAG run's stages are `essp stage` processes with the module's isolated settings (buckets,
topics, Redis keys, and a state folder of its own, so its resident workers are its own)."""

from __future__ import annotations

import copy
import csv
import io
import json
import shutil
import subprocess
import sys
import uuid

import pytest
from conftest import _cleanup

from essp.clients.s3 import ObjectStore, S3Uri
from essp.datasets.ingest import ingest_directory
from essp.datasets.manifest import ManifestStore
from essp.datasets.synth import synthesize
from essp.evaluation.report import read_report
from essp.lifecycle.model_registry import ModelRegistry
from essp.lifecycle.params import RunParamsError
from essp.orchestration.links import load_link
from essp.orchestration.train import validate_params
from essp.settings import SECRETS_FILE
from essp.stack.airflow import airflow_env
from essp.stack.procs import ProcessTable
from essp.stack.services import isolated_settings

pytestmark = pytest.mark.slow

REGISTRY = "dagruns"
CONF = {"dataset": "tiny", "rgb_arch": "tiny", "flow_arch": "tiny", "epochs": 2, "samples_per_epoch": 32,
        "length": 4, "size": 32, "batch_size": 8, "lr": 0.05, "snippets": 3, "fusion": "max",
        "replicas": {"decode": 1, "flow": 1, "rgb": 1}, "stop_data_workers": True, "registry": REGISTRY,
        "run": "dagtest-train"}

RUN_DAG = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids)}
dag = bag.get_dag(sys.argv[2])
try:
    run = dag.test(run_conf=json.loads(sys.argv[3]))
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
else:
    out["state"] = str(run.state)
    out["run_id"] = run.run_id
    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
        out["tasks"] = {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state)
                        for ti in tis}
        xcoms = session.query(XComModel).filter_by(dag_id=run.dag_id, run_id=run.run_id, key="return_value").all()
        out["xcom"] = {(x.task_id if x.map_index < 0 else f"{x.task_id}[{x.map_index}]"): x.value for x in xcoms}
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def dag_env(base_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("dagruns")
    state = root / "state"
    state.mkdir()
    shutil.copy(base_settings.state_dir / SECRETS_FILE, state / SECRETS_FILE)
    tag = "g" + uuid.uuid4().hex[:10]
    settings = isolated_settings(base_settings, tag).model_copy(update={"state_dir": state, "heartbeat_s": 1.0})
    synthesize(root / "videos", classes=3, videos_per_class=6, frames=24, height=48, width=48, keyint=6, seed=5)
    ingest_directory(settings, root / "videos", "tiny")
    env = airflow_env(settings, sql_alchemy_conn=f"sqlite:///{root}/airflow.db", home=root / "airflow")
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield settings, env, root
    from essp.deploy.fleet import LocalFleet

    LocalFleet(settings).stop_all()
    _cleanup(settings)


def run_dag(dag_env, dag_id: str, conf: dict, timeout: int = 600) -> dict:
    settings, env, root = dag_env
    done = subprocess.run([sys.executable, "-c", RUN_DAG, str(settings.dags_folder), dag_id, json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    (root / f"{dag_id}-{uuid.uuid4().hex[:6]}.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    result["log"] = done.stdout + done.stderr
    assert result["import_errors"] == {}
    return result


@pytest.fixture(scope="module")
def trained(dag_env):
    return run_dag(dag_env, "essp_train", CONF)


@pytest.mark.e2e
def test_every_dag_imports(trained):
    assert {"essp_train", "essp_nightly_retrain", "essp_predict", "essp_control", "essp_smoke"} <= set(trained["dags"])


@pytest.mark.e2e
def test_essp_train_runs_end_to_end_with_the_fusion_override(dag_env, trained):
    settings, _, _ = dag_env
    assert trained["state"] == "success", {k: v for k, v in trained.items() if k != "log"}
    assert set(trained["tasks"].values()) == {"success"}, trained["tasks"]
    assert {"train[0]", "train[1]"} <= set(trained["tasks"])  # one mapped task per stream
    # each stream's task logged every epoch of its trainer, deferring in between
    for epoch in (0, 1):
        for stream in ("rgb", "flow"):
            assert f"epoch {epoch} {stream}" in trained["log"]
    assert "ESSP report of run dagtest-train" in trained["log"] and "registry dagruns v1" in trained["log"]
    # the report and the registered model use the override, and prediction goes through it
    report = read_report(settings, "dagtest-train")
    assert report["selected"] == "max"
    assert {"average", "weighted", "max", "product", "learned", "sequence"} <= set(report["evaluation"]["fusion"])
    production = ModelRegistry(settings, REGISTRY).production()
    assert production is not None and production.run == "dagtest-train"
    assert production.fusion["strategy"] == "max"
    summary = trained["xcom"]["report_summary"]
    assert summary["selected"] == "max" and summary["registered"]["promoted"] is True
    # the DAG run is linked to its ESSP run (the UI's report tab), and the workers are gone
    assert load_link(settings, "essp_train", trained["run_id"])["run"] == "dagtest-train"
    table = ProcessTable(settings.state_dir)
    assert not [p for p in table.run_dir.glob("*.pid") if table.record(p.stem)], "workers left running"


@pytest.mark.e2e
def test_predict_dag_scores_a_prefix_with_the_registered_fusion(dag_env, trained):
    settings, _, root = dag_env
    store = ObjectStore(settings)
    test_videos = ManifestStore(settings).load("tiny").split("test")[:2]
    for i, video in enumerate(test_videos):
        location = S3Uri.parse(video.uri)
        store.put_bytes(settings.bucket_videos, f"incoming/clip{i}.mp4", store.get_bytes(location.bucket,
                                                                                         location.key))
    store.put_bytes(settings.bucket_videos, "incoming/broken.mp4", b"not a video at all")
    result = run_dag(dag_env, "essp_predict", {"prefix": "incoming/", "registry": REGISTRY})
    assert result["state"] == "success", result["tasks"]
    out = result["xcom"]["predict_prefix"]
    assert out["fusion"] == "max" and out["videos"] == 3 and out["failed"] == [
        f"s3://{settings.bucket_videos}/incoming/broken.mp4"]
    payload = store.get_json(*_split(out["json"]))
    assert payload["fusion"] == "max"
    scored = [v for v in payload["videos"] if "top" in v]
    assert len(scored) == 2
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(*_split(out["csv"])).decode())))
    assert {r["video"] for r in rows} == {v["video"] for v in payload["videos"]}
    assert any("not a video" in r["error"] or r["error"] for r in rows if r["video"].endswith("broken.mp4"))
    from essp.orchestration.links import load_link

    record = load_link(settings, "essp_predict", result["run_id"])["predictions"]  # what its report tab says
    assert record["json"] == out["json"] and record["prefix"] == "incoming/" and record["videos"] == 3


def _split(uri: str) -> tuple[str, str]:
    location = S3Uri.parse(uri)
    return location.bucket, location.key


@pytest.mark.e2e
def test_nightly_retrain_skips_when_nothing_changed_then_retrains_on_a_new_video(dag_env, trained):
    settings, _, root = dag_env
    assert trained["state"] == "success"
    conf = {"registry": REGISTRY, "epochs": 1, "samples_per_epoch": 24, "replicas": {"decode": 1, "flow": 1, "rgb": 1},
            "stop_data_workers": True}
    quiet = run_dag(dag_env, "essp_nightly_retrain", conf)
    assert quiet["state"] == "success", quiet["tasks"]
    assert quiet["tasks"]["detect_changes"] == "success" and quiet["tasks"]["changed"] == "success"
    assert quiet["tasks"]["refresh_manifest"] == "skipped" and quiet["tasks"]["verify_manifest"] == "skipped"
    assert "no video added or changed" in quiet["log"]
    from essp.orchestration.links import load_link

    skipped = load_link(settings, "essp_nightly_retrain", quiet["run_id"])  # what its report tab says
    assert "no video added or changed" in skipped["skipped"]["reason"] and "run" not in skipped

    # a new training clip of a known class lands in the bucket
    manifest = ManifestStore(settings).load("tiny")
    source = manifest.split("train")[0]
    location = S3Uri.parse(source.uri)
    store = ObjectStore(settings)
    new_key = location.key.rsplit("/", 1)[0] + "/v_new_g99_c01.mp4"
    store.put_bytes(location.bucket, new_key, store.get_bytes(location.bucket, location.key))
    busy = run_dag(dag_env, "essp_nightly_retrain", conf)
    assert busy["state"] == "success", busy["tasks"]
    assert set(busy["tasks"].values()) == {"success"}, busy["tasks"]
    refreshed = busy["xcom"]["refresh_manifest"]
    assert refreshed["written"] and refreshed["version"] == manifest.version + 1
    new = ManifestStore(settings).load(refreshed["manifest"])
    assert f"s3://{location.bucket}/{new_key}" in {v.uri for v in new.split("train")}
    assert [v.id for v in new.split("test")] == [v.id for v in manifest.split("test")]  # the test split is fixed
    # fine-tuned from production: its checkpoints were the starting weights, its fusion kept
    plan = busy["xcom"]["plan_finetune"]
    production_before = ModelRegistry(settings, REGISTRY).get(1)
    assert plan["spec"]["pretrained"] == production_before.streams
    assert plan["spec"]["fusion"] == "max" and plan["spec"]["epochs"] == 1
    assert plan["finetunes"] == {"registry": REGISTRY, "version": 1, "run": "dagtest-train"}
    registered = busy["xcom"]["register_model"]
    assert registered["version"] == 2
    version = ModelRegistry(settings, REGISTRY).get(2)
    assert version.manifest == refreshed["manifest"]
    assert registered["promoted"] == (version.metrics["top1"] > production_before.metrics["top1"])

    again = run_dag(dag_env, "essp_nightly_retrain", conf)
    assert again["tasks"]["refresh_manifest"] == "skipped", again["tasks"]


def _train_dag():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "dags" / "essp_train.py"
    spec = importlib.util.spec_from_file_location("essp_dag_essp_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.essp_train()


@pytest.mark.parametrize(("override", "words"), [
    ({"fusion": "best"}, ["fusion", "'best' is not one of"]),
    ({"epochs": 0}, ["epochs", "less than the minimum of 1"]),
    ({"streams": ["rgb", "audio"]}, ["streams", "'audio' is not one of"]),
    ({"replicas": {"decode": -1}}, ["replicas", "less than the minimum of 0"]),
    ({"run": "no spaces allowed"}, ["run", "does not match"]),
])
def test_a_param_outside_its_schema_is_refused_when_the_run_is_created(override, words):
    # what Airflow checks when a run is created (UI, REST API with HTTP 400, CLI alike): the params
    # of the DAG with the run's conf on top
    from airflow.sdk.definitions.param import ParamValidationError

    def checked(conf: dict) -> dict:  # what DAG.create_dagrun does: the params, the conf on top, validate
        params = copy.deepcopy(_train_dag().params)
        params.update(conf)
        return params.validate()

    with pytest.raises(ParamValidationError) as caught:
        checked({**CONF, **override})
    for word in words:
        assert word in str(caught.value), str(caught.value)
    assert checked(CONF)["fusion"] == "max"  # the good conf passes


@pytest.mark.e2e
def test_a_bad_combination_of_params_fails_the_first_task_naming_it(dag_env):
    # what needs two params is refused by the first task, before anything starts
    result = run_dag(dag_env, "essp_train", {**CONF, "fusion": "weighted", "run": "dagtest-bad"})
    assert result["state"] == "failed"
    assert result["tasks"]["validate_params"] == "failed"
    assert result["tasks"]["verify_manifest"] == "upstream_failed"
    assert "fusion_weights: the weighted fusion needs a weight per stream" in result["log"]


def test_validate_params_names_the_param():
    with pytest.raises(RunParamsError, match="replicas.flow: the run needs at least one flow worker"):
        validate_params({**CONF, "replicas": {"flow": 0}}, dag_id="d", dag_run_id="r")
    with pytest.raises(RunParamsError, match="pretrained: names stream"):
        validate_params({**CONF, "pretrained": {"framediff": "s3://x/y.pt"}}, dag_id="d", dag_run_id="r")
    with pytest.raises(RunParamsError, match="fusoin: Extra inputs are not permitted"):
        validate_params({**CONF, "fusoin": "max"}, dag_id="d", dag_run_id="r")
    plan = validate_params({k: v for k, v in CONF.items() if k != "run"}, dag_id="essp_train",
                           dag_run_id="manual__2026-11-29T01:02:03.123456+00:00")
    assert plan["run"] == "essp_train-manual-20261129T010203-123456-0000"
    assert plan["spec"]["run"] == plan["run"] and plan["streams"] == ["rgb", "flow"]
    assert plan["dag_run"] == {"dag_id": "essp_train", "dag_run_id": "manual__2026-11-29T01:02:03.123456+00:00"}
    # the values as Airflow hands them over: every param, the empty optional ones as None
    from essp.lifecycle.params import RunParams

    spec = RunParams.model_validate(plan["spec"])
    assert spec.features() == {"rgb": {}, "flow": {"method": "dis_fast"}} and spec.registry == REGISTRY
    assert spec.workers() == {"decode": 1, "flow": 1, "rgb": 1, "framediff": 0}
