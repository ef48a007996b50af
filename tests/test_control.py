"""The essp_control stage on the real Redis, Kafka and S3: it refuses a run that does not exist and one that
has finished, says when a command repeats the run's state, and otherwise says the state after it (a stop
waits for the live trainers to confirm)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from essp.clients.kafka import ensure_topics
from essp.clients.redis import redis_client
from essp.clients.s3 import ObjectStore
from essp.contract import RedisKeys, Topics
from essp.dataplane.resident import RunControl
from essp.evaluation.report import report_uri
from essp.lifecycle.params import ControlParams, RunParamsError
from essp.orchestration import control
from essp.orchestration.control import control_run
from essp.training.artifacts import RunStore

RUN = "ctl-run-1"


@pytest.fixture(autouse=True)
def control_topic(settings):
    ensure_topics(settings, [Topics(settings.topic_prefix).control])  # as `essp infra up` makes it


def _started(settings, run: str = RUN, streams=("rgb", "flow")) -> None:
    RunStore(settings, run).save_json("spec.json", {"spec": {"run": run, "streams": list(streams)}})


def _trainer(settings, stream: str, **state) -> None:
    redis_client(settings).set(RedisKeys(settings.redis_prefix).trainer(RUN, stream),
                               json.dumps({"updated_at": time.time(), **state}))


def _control(settings, command: str, run: str = RUN) -> dict:
    return control_run(settings, ControlParams(run=run, command=command))


def test_an_unknown_run_is_refused_with_the_closest_names(settings):
    _started(settings, "ctl-run-1")
    with pytest.raises(RunParamsError, match=r"there is no run 'ctl-run-2' \(no s3://.*/ctl-run-2/spec\.json, "
                                             r"which essp_train writes .*; did you mean ctl-run-1\?"):
        _control(settings, "stop", "ctl-run-2")
    assert RunControl(settings).get("ctl-run-2", fresh=True) == "running"  # nothing recorded for it
    assert redis_client(settings).get(RedisKeys(settings.redis_prefix).run_state("ctl-run-2")) is None


def test_a_finished_run_is_said_to_be_finished(settings):
    _started(settings)
    bucket, _, key = report_uri(settings, RUN).removeprefix("s3://").partition("/")
    ObjectStore(settings).put_json(bucket, key, {"run": RUN})
    with pytest.raises(RunParamsError, match=rf"run {RUN} has finished \(its report is s3://.*report\.json\): "
                                             "there is nothing to stop"):
        _control(settings, "stop")
    assert redis_client(settings).get(RedisKeys(settings.redis_prefix).run_state(RUN)) is None


def test_pause_then_pause_again_then_resume_say_what_happened(settings):
    _started(settings)
    _trainer(settings, "rgb", status="training", epoch=0)
    first = _control(settings, "pause")
    assert first["before"] == "running" and first["state"] == "paused", first
    assert first["message"] == (f"run {RUN} is now paused (it was running): its jobs wait in Kafka and its epoch "
                                "timeout is held; resume it with essp_control command=resume; trainers: rgb training, "
                                "flow not started")
    again = _control(settings, "pause")
    assert again["message"].startswith(f"run {RUN} was already paused: nothing changed"), again
    resumed = _control(settings, "resume")
    assert resumed["state"] == "running" and resumed["message"].startswith(f"run {RUN} is now running (it was paused)")
    assert RunControl(settings).get(RUN, fresh=True) == "running"


def test_essp_controls_dag_run_records_what_happened_for_its_report_tab(settings):
    from essp.orchestration.links import DagRun, load_link

    _started(settings)
    dag_run = DagRun(dag_id="essp_control", dag_run_id="manual__ctl-1")
    done = control_run(settings, ControlParams(run=RUN, command="pause"), dag_run)
    record = load_link(settings, "essp_control", "manual__ctl-1")
    assert record["control"]["message"] == done["message"] and record["control"]["state"] == "paused"
    assert "run" not in record  # it drives no run: the tab shows what it did, not a report
    refused = DagRun(dag_id="essp_control", dag_run_id="manual__ctl-2")
    with pytest.raises(RunParamsError):
        control_run(settings, ControlParams(run="ctl-nope-9", command="stop"), refused)
    record = load_link(settings, "essp_control", "manual__ctl-2")
    assert record["error"].startswith("run: there is no run 'ctl-nope-9'") and record["control"]["command"] == "stop"


def test_stop_waits_for_the_live_trainers_to_confirm(settings, monkeypatch):
    monkeypatch.setattr(control, "STOP_CONFIRM_S", 10.0)
    _started(settings)
    _trainer(settings, "rgb", status="training", epoch=1)
    _trainer(settings, "flow", status="epoch_done", epoch_done=1)

    def trainers_obey() -> None:  # as the trainers do on the control message: checkpoint, then say stopped
        time.sleep(1.0)
        _trainer(settings, "rgb", status="stopped", epoch=1)
        time.sleep(0.5)
        _trainer(settings, "flow", status="stopped", epoch_done=1)

    obeying = threading.Thread(target=trainers_obey)
    obeying.start()
    started = time.monotonic()
    try:
        result = _control(settings, "stop")
    finally:
        obeying.join()
    assert 1.0 <= time.monotonic() - started < 10.0
    assert result["trainers"] == {"rgb": "stopped", "flow": "stopped"}, result
    assert result["message"].startswith(f"run {RUN} is now stopped (it was running): its trainers checkpoint")
    with pytest.raises(RunParamsError, match=f"run {RUN} is stopped: a stopped run cannot be paused"):
        _control(settings, "pause")


def test_a_stopped_run_is_not_scored_fused_or_registered(settings):
    # release_trainers runs however training ended (trigger rule all_done), so the scoring stage after it is
    # what keeps a run stopped part way from being scored and registered as if it were trained
    from essp.errors import UserError
    from essp.lifecycle.params import RunParams
    from essp.orchestration.stages import run_stage

    spec = RunParams(run=RUN, dataset="synth", epochs=5)
    RunStore(settings, RUN).save_json("spec.json", {"spec": spec.model_dump(mode="json")})
    for stream in spec.streams:
        _trainer(settings, stream, status="stopped", epoch_done=1, detail="stopped mid-epoch")
    for split in ("test", "val"):
        with pytest.raises(UserError, match=rf"run {RUN} has trained 2 of its 5 epochs \(stopped, or a stream "
                                            r"failed\): it is not scored"):
            run_stage(f"score-{split}", settings, {"run": RUN})
