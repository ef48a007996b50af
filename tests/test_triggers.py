"""EpochDoneTrigger on the real Redis: it fires when every stream finished the epoch, fails on a failed
trainer, a dead local trainer process and a stopped run, waits through a pause without timing out,
and survives a serialize/rebuild (what the triggerer does)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from essp.clients.redis import redis_client
from essp.connections import REDIS_CONN_ID, connection_env_vars
from essp.contract import RedisKeys
from essp.deploy.local import scope_digest, scope_of, trainer_name, worker_name
from essp.operators import triggers
from essp.operators.triggers import EpochDoneTrigger
from essp.stack.procs import ProcessTable

RUN = "trig-run"


@pytest.fixture
def redis_kwargs(settings, monkeypatch):
    """The trigger reaches Redis through the Airflow connection essp_redis (here from its AIRFLOW_CONN_
    variable, as `essp airflow up` defines it): the trigger's kwargs carry the connection id only."""
    name = f"AIRFLOW_CONN_{REDIS_CONN_ID.upper()}"
    monkeypatch.setenv(name, connection_env_vars(settings)[name])
    return {"redis_conn_id": REDIS_CONN_ID}


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(triggers, "MIN_FIRE_S", 0.0)


def _state(settings, stream: str, **state) -> None:
    redis_client(settings).set(RedisKeys(settings.redis_prefix).trainer(RUN, stream), json.dumps(state))


def _first_event(trigger: EpochDoneTrigger, timeout: float = 20):
    async def first():
        async for event in trigger.run():
            return event.payload
        return None

    return asyncio.run(asyncio.wait_for(first(), timeout))


def _rebuilt(trigger: EpochDoneTrigger) -> EpochDoneTrigger:
    classpath, kwargs = trigger.serialize()
    assert classpath == "essp.operators.triggers.EpochDoneTrigger"
    # what Airflow stores in its database and shows in its REST API: no address, no credential
    assert not {"redis", "password", "host"} & set(kwargs) and kwargs["redis_conn_id"] == REDIS_CONN_ID
    return EpochDoneTrigger(**json.loads(json.dumps(kwargs)))


def test_fires_when_every_stream_finished_the_epoch(settings, redis_kwargs):
    _state(settings, "rgb", status="epoch_done", epoch_done=1, stats={"loss": 0.5})
    _state(settings, "flow", status="training", epoch_done=0)
    trigger = _rebuilt(EpochDoneTrigger(run=RUN, streams=["rgb", "flow"], epoch=1, **redis_kwargs, timeout_s=30,
                                        poll_s=0.1, carry={"history": [{"epoch": 0}]}))

    async def finish_flow_later():
        await asyncio.sleep(0.5)
        _state(settings, "flow", status="epoch_done", epoch_done=1, stats={"loss": 0.7})

    async def both():
        task = asyncio.create_task(finish_flow_later())
        started = time.monotonic()
        async for event in trigger.run():
            await task
            return event.payload, time.monotonic() - started

    payload, waited = asyncio.run(both())
    assert payload["status"] == "done" and payload["epoch"] == 1 and waited >= 0.4
    assert payload["stats"] == {"rgb": {"loss": 0.5}, "flow": {"loss": 0.7}}
    assert payload["carry"] == {"history": [{"epoch": 0}]}


def test_a_failed_trainer_fails_the_wait_with_its_detail(settings, redis_kwargs):
    _state(settings, "rgb", status="failed", epoch_done=-1, detail="CUDA out of memory")
    payload = _first_event(EpochDoneTrigger(run=RUN, streams=["rgb"], epoch=0, **redis_kwargs, timeout_s=30,
                                            poll_s=0.1))
    assert payload["status"] == "failed" and "CUDA out of memory" in payload["detail"]


def test_a_dead_local_trainer_fails_the_wait_with_its_log(settings, redis_kwargs, tmp_path):
    table = ProcessTable(tmp_path)
    name = trainer_name(RUN, "flow")
    record = table.spawn(name, ["sh", "-c", "echo 'trainer: loading checkpoint'; echo 'Killed' >&2; exit 137"])
    deadline = time.monotonic() + 10
    while table.exited_early(record) is None and time.monotonic() < deadline:  # reaps it (no zombie)
        time.sleep(0.05)
    assert table.exited_early(record) == 137
    _state(settings, "flow", status="training", epoch_done=-1)
    payload = _first_event(EpochDoneTrigger(run=RUN, streams=["flow"], epoch=0, **redis_kwargs, timeout_s=30,
                                            poll_s=0.1, state_dir=str(tmp_path)))
    assert payload["status"] == "failed" and "exited before finishing epoch 0" in payload["detail"]
    assert "Killed" in payload["detail"]



def test_a_crashed_local_data_worker_ends_the_wait_naming_the_kind(settings, redis_kwargs, tmp_path):
    # The embedded default has no Deployment: a data worker that crashed mid-epoch is seen by the trigger
    # (fewer running than the run wants, in its scope), whose task starts it again. Another scope's
    # worker of the same kind does not count; a paused run is left alone.
    table = ProcessTable(tmp_path)
    scope = scope_of(settings)
    sleeper = ["sleep", "60"]
    mine = table.spawn(worker_name("decode", 0), sleeper, labels={"scope": scope})
    table.spawn(worker_name("decode", 1), sleeper, labels={"scope": "another"})
    table.spawn(worker_name("flow", 0), sleeper, labels={"scope": scope})
    _state(settings, "flow", status="training", epoch_done=-1)
    kwargs = {"run": RUN, "streams": ["flow"], "epoch": 0, **redis_kwargs, "timeout_s": 30, "poll_s": 0.1,
              "state_dir": str(tmp_path), "keep": {"decode": 1, "flow": 1, "framediff": 0},
              "scope": scope_digest(scope)}
    try:
        trigger = EpochDoneTrigger(**kwargs)
        assert scope not in json.dumps(trigger.serialize()[1]), "addresses in the trigger's kwargs"
        with pytest.raises(TimeoutError):  # every wanted worker runs: it waits
            _first_event(trigger, timeout=1.0)
        os.killpg(mine.pid, signal.SIGKILL)
        payload = _first_event(_rebuilt(trigger))
        assert payload["status"] == "short" and payload["detail"] == "data workers running: decode 0 of 1", payload
        redis_client(settings).set(RedisKeys(settings.redis_prefix).run_state(RUN), "paused")
        with pytest.raises(TimeoutError):
            _first_event(EpochDoneTrigger(**kwargs), timeout=1.0)
    finally:
        for name in (worker_name("decode", 0), worker_name("decode", 1), worker_name("flow", 0)):
            table.stop(name, timeout_s=5)

def test_stop_ends_the_wait_and_pause_holds_the_timeout(settings, redis_kwargs):
    keys = RedisKeys(settings.redis_prefix)
    client = redis_client(settings)
    _state(settings, "rgb", status="training", epoch_done=-1)
    client.set(keys.run_state(RUN), "stopped")
    payload = _first_event(EpochDoneTrigger(run=RUN, streams=["rgb"], epoch=0, **redis_kwargs, timeout_s=30,
                                            poll_s=0.1))
    assert payload["status"] == "stopped" and "essp control stop" in payload["detail"]

    # paused for longer than the timeout: no timeout; resumed and finished: done
    client.set(keys.run_state(RUN), "paused")
    trigger = EpochDoneTrigger(run=RUN, streams=["rgb"], epoch=0, **redis_kwargs, timeout_s=1.0, poll_s=0.1)

    async def resume_later():
        await asyncio.sleep(2.0)
        client.set(keys.run_state(RUN), "running")
        _state(settings, "rgb", status="epoch_done", epoch_done=0, stats={})

    async def run():
        task = asyncio.create_task(resume_later())
        async for event in trigger.run():
            await task
            return event.payload

    assert asyncio.run(run())["status"] == "done"

    # not paused: the timeout names the stream that is late
    _state(settings, "rgb", status="training", epoch_done=0)
    payload = _first_event(EpochDoneTrigger(run=RUN, streams=["rgb"], epoch=1, **redis_kwargs, timeout_s=0.5,
                                            poll_s=0.1))
    assert payload["status"] == "timeout" and "not finished by rgb" in payload["detail"]


def test_a_triggerer_restarted_during_a_pause_longer_than_the_timeout_does_not_time_out(settings, redis_kwargs):
    # issue 11, fault 9: the timeout (1.5 s) leaves out paused time as the run's pause ledger in Redis
    # has it, not as one trigger instance counted it: the triggerer goes down during a pause and a
    # trigger rebuilt from its kwargs (what a restarted triggerer runs) goes on with the same clock
    keys = RedisKeys(settings.redis_prefix)
    client = redis_client(settings)
    _state(settings, "rgb", status="training", epoch_done=-1)
    trigger = EpochDoneTrigger(run=RUN, streams=["rgb"], epoch=0, **redis_kwargs, timeout_s=1.5, poll_s=0.1)

    async def first_life():  # 0.5 s running, then paused; the triggerer dies 0.5 s into the pause
        async def pause_later():
            await asyncio.sleep(0.5)
            client.set(keys.run_state(RUN), "paused")

        task = asyncio.create_task(pause_later())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_event(trigger), 1.0)
        await task

    asyncio.run(first_life())
    time.sleep(1.0)  # no triggerer for 1 s; the run stays paused
    rebuilt = _rebuilt(trigger)

    async def second_life():  # 1 s more of pause (2.5 s in all), resumed, the epoch done 0.3 s later
        async def resume_and_finish():
            await asyncio.sleep(1.0)
            client.set(keys.run_state(RUN), "running")
            await asyncio.sleep(0.3)
            _state(settings, "rgb", status="epoch_done", epoch_done=0, stats={})

        task = asyncio.create_task(resume_and_finish())
        payload = await asyncio.wait_for(_event(rebuilt), 10)
        await task
        return payload

    payload = asyncio.run(second_life())
    assert payload["status"] == "done", payload  # 0.8 s of running time, 2.5 s paused: no timeout


def test_the_timeout_runs_across_a_triggerer_restart(settings, redis_kwargs):
    # not paused: the rebuilt trigger times out 1.2 s after the wait began, not 1.2 s after it was rebuilt
    _state(settings, "rgb", status="training", epoch_done=-1)
    trigger = EpochDoneTrigger(run=RUN, streams=["rgb"], epoch=0, **redis_kwargs, timeout_s=1.2, poll_s=0.1)

    async def first_life():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_event(trigger), 0.8)

    asyncio.run(first_life())
    rebuilt = _rebuilt(trigger)
    started = time.monotonic()
    payload = _first_event(rebuilt, timeout=10)
    assert payload["status"] == "timeout" and time.monotonic() - started < 1.0, payload


def test_a_trainer_without_heartbeats_fails_the_wait_at_once(settings, redis_kwargs):
    # issue 11, fault 8: wherever the trainer ran (no local process table here, as in Kubernetes), a state
    # that has not finished the epoch and names a worker whose live key expired ends the wait with the
    # reason, long before the epoch's timeout (an hour here)
    keys = RedisKeys(settings.redis_prefix)
    client = redis_client(settings)
    _state(settings, "flow", status="training", epoch_done=-1, epoch=0, worker="train-flow-dead",
           updated_at=time.time() - 120)
    _state(settings, "rgb", status="training", epoch_done=-1, epoch=0, worker="train-rgb-live",
           updated_at=time.time() - 120)
    client.set(keys.worker("train-rgb-live"), "{}", ex=60)  # rgb heartbeats: alive
    started = time.monotonic()
    payload = _first_event(EpochDoneTrigger(run=RUN, streams=["rgb", "flow"], epoch=0, **redis_kwargs,
                                            timeout_s=3600, poll_s=0.1), timeout=10)
    assert payload["status"] == "failed" and payload["stream"] == "flow", payload
    assert "no heartbeat from trainer train-flow-dead" in payload["detail"]
    assert time.monotonic() - started < 5
    # a live trainer keeps the wait going: only the timeout ends it
    client.set(keys.worker("train-flow-dead"), "{}", ex=60)
    payload = _first_event(EpochDoneTrigger(run=RUN, streams=["rgb", "flow"], epoch=0, **redis_kwargs,
                                            timeout_s=1.0, poll_s=0.1), timeout=10)
    assert payload["status"] == "timeout", payload


async def _event(trigger: EpochDoneTrigger):
    async for event in trigger.run():
        return event.payload
    return None


def test_a_trainer_pod_that_cannot_run_is_logged_at_once_and_named_by_the_timeout(settings, redis_kwargs,
                                                                                   monkeypatch, capfd):
    # Kubernetes: the trigger reads the waiting streams' trainer pods (tests/test_e2e_k8s.py reads a real
    # cluster's); an unschedulable one is logged within the first poll and the timeout's detail names it,
    # but the wait is not cut short (an autoscaler may still add the node)
    from essp.deploy import kube

    asked = []

    def blockers(namespace, run, streams, core_api=None):  # noqa: ANN001, ANN202
        asked.append((namespace, run, list(streams)))
        return {"flow": "pod essp-train-x-flow-1: not scheduled (Unschedulable): 0/1 nodes are available: "
                        "1 Insufficient cpu."}

    monkeypatch.setattr(kube, "trainer_blockers", blockers)
    _state(settings, "rgb", status="training", epoch_done=0)  # rgb has finished: only flow is asked for
    trigger = _rebuilt(EpochDoneTrigger(run=RUN, streams=["rgb", "flow"], epoch=0, **redis_kwargs, timeout_s=1.5,
                                        poll_s=0.1, namespace="essp"))
    payload = _first_event(trigger, timeout=10)
    seen = capfd.readouterr()  # structlog: what the triggerer writes to the task's log
    assert payload["status"] == "timeout", payload
    assert payload["detail"].endswith("; the trainer pods: flow: pod essp-train-x-flow-1: not scheduled "
                                      "(Unschedulable): 0/1 nodes are available: 1 Insufficient cpu."), payload
    assert asked and asked[0] == ("essp", RUN, ["flow"])
    assert len(asked) == 1  # once per BLOCKER_CHECK_S, not every poll
    line = (f"The flow trainer of run {RUN} does not run: pod essp-train-x-flow-1: not scheduled (Unschedulable): "
            "0/1 nodes are available: 1 Insufficient cpu.")
    assert (seen.out + seen.err).count(line) == 1, seen


def test_without_a_namespace_no_pod_is_read(settings, redis_kwargs, monkeypatch):
    from essp.deploy import kube

    monkeypatch.setattr(kube, "trainer_blockers", lambda *a, **k: pytest.fail("read pods in local mode"))
    _state(settings, "rgb", status="training", epoch_done=-1)
    payload = _first_event(EpochDoneTrigger(run=RUN, streams=["rgb"], epoch=0, **redis_kwargs, timeout_s=0.5,
                                            poll_s=0.1))
    assert payload["status"] == "timeout" and "trainer pods" not in payload["detail"], payload
