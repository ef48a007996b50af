"""Faults 8 and 14 of issue 11 under Airflow (`dag.test()` on the real services): a trainer SIGKILLed
mid-epoch, and two DAG runs given one `run` id.

The run's flow trainer is killed (its whole process group, SIGKILL: no checkpoint, no goodbye) once it
is training epoch 1 and its stream has taken samples of that epoch into its prefetch queue. The train
task's wait ends at once naming the dead trainer (not at the epoch's timeout); its retry starts the
trainer again, which resumes from epoch 0's checkpoint, and delivers the epoch again (the samples the
dead trainer took are gone with it); the run finishes with every planned sample trained. Scoring,
fusion and registration are marked successful without running (`mark_success_pattern`): the fault is in
training, and they are tested in test_dag_runs.py.

A second DAG run given the `run` of one that is training is refused by its first task, naming the
owner, while the first one's trainers go on; the first finishes and gives its claim back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from faultkit import read_topic
from test_dag_runs import CONF, dag_env  # noqa: F401 - the module's Airflow (a SQLite DB of its own)

from essp.clients.redis import redis_client
from essp.contract import RedisKeys, Topics, TrainerState
from essp.dataplane.resident import RunControl, publish_control
from essp.deploy.fleet import LocalFleet
from essp.deploy.local import trainer_name, worker_name
from essp.lifecycle.claims import run_owner
from essp.lifecycle.epochs import trainer_states
from essp.stack.procs import ProcessTable
from essp.training.artifacts import RunStore

pytestmark = [pytest.mark.fault, pytest.mark.long, pytest.mark.slow]

RUN = "fault8-run"
SAMPLES = 32
TIMEOUT_S = 900  # the epoch timeout: the run must end long before one is waited out
SKIPPED = "score_test|score_val|fuse_and_report|register_model|report_summary"

RUN_DAG = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session

bag = DagBag(dag_folder=sys.argv[1])
dag = bag.get_dag(sys.argv[2])
run = dag.test(run_conf=json.loads(sys.argv[3]), mark_success_pattern=sys.argv[4])
with create_session() as session:
    tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
    tasks = {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): [str(ti.state), ti.try_number]
             for ti in tis}
print("RESULT " + json.dumps({"state": str(run.state), "tasks": tasks}))
"""


def _kill_mid_epoch(settings, stop: threading.Event, out: dict) -> None:
    """SIGKILL the flow trainer's process group once it trains epoch 1 and its epoch-1 notices exist."""
    ready = Topics(settings.topic_prefix).ready(RUN, "flow", 1)
    table = ProcessTable(settings.state_dir)
    while not stop.is_set():
        state = trainer_states(settings, RUN, ["flow"])["flow"]
        if state is not None and state.status == "training" and state.epoch == 1 and read_topic(settings, ready):
            record = table.record(trainer_name(RUN, "flow"))
            if record is not None:
                os.killpg(record.pid, signal.SIGKILL)
                out["killed_at"] = time.monotonic()
                out["state_at_kill"] = trainer_states(settings, RUN, ["flow"])["flow"]
                return
        stop.wait(0.1)


def _train_while(env_of_dag, conf: dict, fault, name: str) -> tuple[dict, str, dict, float]:  # noqa: ANN001
    """Run essp_train under dag.test() while ``fault(settings, stop, out)`` runs in a thread; returns the
    DAG run's result, its log, what the fault put in ``out`` and the seconds it took."""
    settings, env, root = env_of_dag
    stop, out = threading.Event(), {}
    killer = threading.Thread(target=fault, args=(settings, stop, out), daemon=True)
    killer.start()
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", RUN_DAG, str(settings.dags_folder), "essp_train",
                               json.dumps(conf), SKIPPED], env=env, capture_output=True, text=True, timeout=840)
    finally:
        stop.set()
        killer.join(5)
    took = time.monotonic() - started
    log = done.stdout + done.stderr
    (root / f"{name}-{uuid.uuid4().hex[:6]}.log").write_text(log)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, log[-6000:]
    return json.loads(lines[-1][len("RESULT "):]), log, out, took

def test_a_trainer_killed_mid_epoch_is_restarted_by_the_retry_and_the_run_finishes(dag_env):  # noqa: F811
    settings, env, root = dag_env
    conf = {**CONF, "run": RUN, "epochs": 2, "samples_per_epoch": SAMPLES, "batch_size": 4,
            "epoch_timeout_s": TIMEOUT_S, "registry": "fault8"}
    result, log, out, took = _train_while(dag_env, conf, _kill_mid_epoch, "fault8")

    # the trainer was killed in the middle of epoch 1 (epoch 0 finished, epoch 1 not)
    assert "killed_at" in out, "the flow trainer was never seen training epoch 1"
    at_kill: TrainerState = out["state_at_kill"]
    assert at_kill.epoch_done == 0, at_kill
    # the wait ended at once, naming the dead trainer; the retry re-delivered the epoch; the run finished
    assert "trainer process of run fault8-run exited before finishing epoch 1" in log, log[-6000:]
    assert "died before finishing it; planned and published it again" in log, log[-6000:]
    assert result["state"] == "success", result["tasks"]
    train = {k: v for k, v in result["tasks"].items() if k.startswith("train[")}
    assert all(state == "success" for state, _ in train.values()), train
    assert max(tries for _, tries in train.values()) == 2, train  # one retry, not two timeouts
    assert took < TIMEOUT_S / 2, took
    # the new trainer resumed from epoch 0's checkpoint and finished epoch 1 (its stream ends an epoch only
    # when every planned sample arrived or is dead-lettered: the ones the dead trainer took came again)
    state = trainer_states(settings, RUN, ["flow"])["flow"]
    assert state is not None and state.epoch_done == 1, state  # "stopped" now: release_trainers stopped it
    pointer = RunStore(settings, RUN).latest_pointer("flow")
    assert pointer is not None and int(pointer["epoch"]) == 2
    trainer_log = ProcessTable(settings.state_dir).tail(trainer_name(RUN, "flow"), 400)
    second_life = trainer_log.rsplit("starting:", 1)[-1]
    assert "resumed flow at epoch 1" in second_life, trainer_log[-3000:]
    assert "flow epoch 1: loss" in second_life and "flow epoch 0: loss" not in second_life, trainer_log[-3000:]


def test_a_second_dag_run_given_the_same_run_is_refused_while_the_first_trains(dag_env):  # noqa: F811
    # issue 11, fault 14: both used to plan, and the first to finish stopped the other's trainers
    settings, env, root = dag_env
    run = "fault14-run"
    conf = {**CONF, "run": run, "epochs": 1, "samples_per_epoch": 8, "registry": "fault14"}
    RunControl(settings).set(run, "paused")  # the first DAG run waits in its train task until resumed
    argv = [sys.executable, "-c", RUN_DAG, str(settings.dags_folder), "essp_train", json.dumps(conf), SKIPPED]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        request = RedisKeys(settings.redis_prefix).epoch_request(run)
        deadline = time.monotonic() + 300
        while redis_client(settings).get(request) is None:  # its train task planned epoch 0 and waits
            assert first.poll() is None and time.monotonic() < deadline, "the first DAG run never got to train"
            time.sleep(0.5)
        owner = run_owner(settings, run)
        assert owner is not None and owner.startswith("essp_train/manual__")
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        log = second.stdout + second.stderr
        (root / f"fault14-second-{uuid.uuid4().hex[:6]}.log").write_text(log)
        result = json.loads([line for line in second.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
        assert result["state"] == "failed" and result["tasks"]["validate_params"][0] == "failed", result
        assert result["tasks"]["verify_manifest"][0] == "upstream_failed", result
        assert f"run {run} is already being trained by DAG run {owner}" in log and "that DAG run is running" in log
        # the first DAG run's claim and trainers are untouched
        assert run_owner(settings, run) == owner
        fleet = LocalFleet(settings)
        assert fleet.trainer(run, "rgb") is not None and fleet.trainer(run, "flow") is not None
    finally:
        publish_control(settings, "resume", run=run)
        out, _ = first.communicate(timeout=600)
    (root / f"fault14-first-{uuid.uuid4().hex[:6]}.log").write_text(out)
    done = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert done["state"] == "success", done["tasks"]
    assert run_owner(settings, run) is None  # its teardown gave the claim back: the run can be resumed


def _kill_decoder_after_epoch_0(settings, stop: threading.Event, out: dict) -> None:
    """SIGKILL the run's only decode worker as soon as the flow trainer has finished epoch 0: before epoch 1
    is decoded (a kill in the middle of a 32-sample epoch often came after its last decode, and the epoch
    ended before the trigger looked), so epoch 1 cannot end unless a decoder is started again."""
    table = ProcessTable(settings.state_dir)
    while not stop.is_set():
        state = trainer_states(settings, KEEP_RUN, ["flow"])["flow"]
        if state is not None and state.epoch_done >= 0:
            record = table.record(worker_name("decode", 0))
            if record is not None:
                os.killpg(record.pid, signal.SIGKILL)
                out["killed_pid"] = record.pid
                out["epoch_done_at_kill"] = state.epoch_done
                return
        stop.wait(0.05)


KEEP_RUN = "keeper-run"


def test_a_data_worker_that_crashed_is_started_again_and_the_run_goes_on(dag_env):  # noqa: F811
    # The embedded default has no Deployment to restart a crashed worker: the epoch's trigger sees the run
    # short of a decode worker, its task starts one again and waits on for the same epoch. Without it
    # epoch 1 would wait out its timeout (no decoder is left) and fail.
    settings, env, root = dag_env
    conf = {**CONF, "run": KEEP_RUN, "epochs": 2, "samples_per_epoch": SAMPLES, "batch_size": 4,
            "epoch_timeout_s": TIMEOUT_S, "registry": "keeper"}
    result, log, out, took = _train_while(dag_env, conf, _kill_decoder_after_epoch_0, "keeper")
    assert out.get("epoch_done_at_kill") == 0, f"the decoder was not killed between epochs 0 and 1: {out}"
    assert "data workers running: decode 0 of 1; started again: worker-decode-0" in log, log[-6000:]
    assert result["state"] == "success", result["tasks"]
    train = {k: v for k, v in result["tasks"].items() if k.startswith("train[")}
    assert all(state == "success" and tries == 1 for state, tries in train.values()), train  # no retry
    assert took < TIMEOUT_S / 2, took
    state = trainer_states(settings, KEEP_RUN, ["flow"])["flow"]
    assert state is not None and state.epoch_done == 1, state
