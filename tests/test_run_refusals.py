"""Errors before a run starts, or one line (issue 13): what a param's schema can say is refused when the run is
created; what only code can check fails the first task with one line, no traceback, which is also the DAG
run's note and the report tab's error."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from essp.connections import connection_env_vars
from essp.lifecycle.params import NightlyParams, RunParams
from essp.operators.params import dag_params
from essp.stack.airflow import airflow_env

pytestmark = pytest.mark.slow

WEIGHTED = {"fusion": "weighted", "fusion_weights": {"rgb": 1}}
LINE = ("bad training parameters: fusion_weights: must name each stream exactly once (unknown: none, "
        "missing: ['flow'])")


def _validated(model, conf: dict) -> dict:
    """What Airflow does when a run is created (DAG.create_dagrun): the DAG's params, the conf on top, each
    param checked against its own schema."""
    from airflow.sdk.definitions.param import ParamsDict

    params = copy.deepcopy(ParamsDict(dag_params(model)))
    params.update(conf)
    return params.validate()


@pytest.mark.parametrize(("model", "conf", "words"), [
    (RunParams, {"fusion_weights": {"rgb": 1, "audio": 2}}, ["fusion_weights", "'audio' is not one of"]),
    (RunParams, {"fusion_weights": {}}, ["fusion_weights", "should be non-empty"]),
    (RunParams, {"fusion_weights": {"rgb": -1, "flow": 1}}, ["fusion_weights", "less than the minimum of 0"]),
    (RunParams, {"pretrained": {"rbg": "s3://essp-models/r.pt"}}, ["pretrained", "'rbg' is not one of"]),
    (RunParams, {"replicas": {"decoder": 1}}, ["replicas", "'decoder' is not one of"]),
    (NightlyParams, {"replicas": {"flw": 1}}, ["replicas", "'flw' is not one of"]),
])
def test_what_one_params_schema_can_say_is_refused_when_the_run_is_created(model, conf, words):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError) as caught:
        _validated(model, conf)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_the_form_triggers_at_the_defaults_and_leaves_two_param_checks_to_the_first_task():
    for model in (RunParams, NightlyParams):
        values = _validated(model, {})
        model.model_validate(values)  # the defaults are a valid run
    assert _validated(RunParams, {})["fusion_weights"] is None  # optional: null, not {}
    ok = _validated(RunParams, {"fusion": "weighted", "fusion_weights": {"rgb": 1, "flow": 2.5}})
    assert ok["fusion_weights"] == {"rgb": 1, "flow": 2.5}
    # a schema is one param's: a weight missing for one of the run's streams passes it (validate_params refuses it)
    assert _validated(RunParams, WEIGHTED)["fusion_weights"] == {"rgb": 1}


RUN_DAG = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.listeners.listener import get_listener_manager
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session
from essp.operators.refusal import NOTES

get_listener_manager().add_listener(NOTES)  # what the ESSP plugin's `listeners` does in the scheduler
bag = DagBag(dag_folder=sys.argv[1])
run = bag.get_dag(sys.argv[2]).test(run_conf=json.loads(sys.argv[3]))
with create_session() as session:
    tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
    note = session.query(DagRun).filter_by(dag_id=run.dag_id, run_id=run.run_id).one().note
    out = {"state": str(run.state), "run_id": run.run_id, "note": note,
           "tasks": {ti.task_id: str(ti.state) for ti in tis if ti.map_index < 0}}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture
def sqlite_env(settings, tmp_path):
    env = airflow_env(settings, sql_alchemy_conn=f"sqlite:///{tmp_path}/airflow.db", home=tmp_path / "airflow")
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return env


def test_a_weight_missing_for_a_stream_fails_validate_params_with_one_line_and_no_traceback(settings, sqlite_env):
    from essp.orchestration.links import load_link

    done = subprocess.run([sys.executable, "-c", RUN_DAG, str(settings.dags_folder), "essp_train",
                           json.dumps(WEIGHTED)], env=sqlite_env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, log[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["state"] == "failed", result
    assert result["tasks"]["validate_params"] == "failed"
    assert result["tasks"]["verify_manifest"] == "upstream_failed"
    # the task's log: the line, then "Task exited" (SystemExit: no stack), and no traceback anywhere
    assert "Traceback" not in log, log[-4000:]
    task_log = log[log.index("[DAG TEST] starting task_id=validate_params"):log.index("[DAG TEST] end task")]
    errors = [line for line in task_log.splitlines() if "[error" in line]
    assert len(errors) == 2 and LINE in errors[0] and "Task exited" in errors[1], errors
    # the DAG run's note (set by the listener when the DAG run failed) and the report tab's record
    assert result["note"] == LINE
    assert load_link(settings, "essp_train", result["run_id"])["error"] == LINE


REPLICAS_LINE = "bad training parameters: replicas.flow: the run needs at least one flow worker (got 0)"


@pytest.fixture
def refusing_plan(settings, monkeypatch):
    """plan-finetune's params for a registry with a production model, with a replica count the run cannot
    train with (a check of code: the schema allows 0 flow workers); the stage process finds the services
    through the connections."""
    from essp.lifecycle.model_registry import ModelRegistry

    for name, value in connection_env_vars(settings).items():
        monkeypatch.setenv(name, value)
    registry = ModelRegistry(settings, "refusals")
    model = registry.register(run="r0", streams={"rgb": "s3://essp-models/rgb.pt", "flow": "s3://essp-models/flow.pt"},
                              fusion={"strategy": "average"}, metrics={"top1": 0.5}, class_names=["a", "b"])
    registry.promote(model.version, force=True)
    return {"params": NightlyParams(registry="refusals", replicas={"flow": 0}).model_dump(mode="json"),
            "manifest": "tiny", "dag_run": {"dag_id": "essp_nightly_retrain", "dag_run_id": "m1"}}


def test_a_stage_refusing_its_params_fails_its_task_with_the_line(refusing_plan):
    # essp_nightly_retrain's plan_finetune runs the same parse (essp.lifecycle.params.parse_params) in its stage
    # process: the stage writes {"refused": line} as its result, and the operator raises the line alone
    from essp.operators.refusal import StageRefused
    from essp.operators.stage import EsspStageOperator

    op = EsspStageOperator(task_id="plan_finetune", mode="local", stage_params=refusing_plan)
    with pytest.raises(StageRefused) as caught:
        op.execute_local()
    assert caught.value.line == REPLICAS_LINE


def test_a_refused_pods_result_is_kept_for_the_task_and_not_pushed(settings, monkeypatch, refusing_plan):
    """Kubernetes mode: the pod's stage writes {"refused": line} to S3; extract_xcom (which the provider calls
    for a failed pod too) keeps the line for trigger_reentry to fail the task with, and pushes nothing."""
    from kubernetes.client import models as k8s

    from essp.clients.s3 import ObjectNotFound, ObjectStore
    from essp.lifecycle.params import RunParamsError
    from essp.operators.stage import EsspStageOperator
    from essp.orchestration.stages import kubernetes_result_uri, run_stage

    ObjectStore(settings).ensure_bucket(settings.bucket_runs)
    pod_name = "essp-plan-finetune-abc123"
    monkeypatch.setenv("ESSP_RESULT_FILE", kubernetes_result_uri(settings, pod_name))
    with pytest.raises(RunParamsError, match="replicas.flow"):
        run_stage("plan-finetune", settings, refusing_plan)
    state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=2))
    failed = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=pod_name), status=k8s.V1PodStatus(
        phase="Failed", container_statuses=[k8s.V1ContainerStatus(
            name="base", state=state, image="i", image_id="i", ready=False, restart_count=0)]))
    op = EsspStageOperator(task_id="plan_finetune")
    assert op.extract_xcom(failed) is None and op._refused == REPLICAS_LINE
    with pytest.raises(ObjectNotFound):  # read once, then removed
        ObjectStore(settings).get_json(settings.bucket_runs, f"stage-results/{pod_name}.json")
