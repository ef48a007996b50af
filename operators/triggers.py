"""Deferrable waits of the ESSP DAGs: the triggerer watches the trainers' state in Redis, so no
Airflow worker slot sleeps while an epoch trains.

A trainer records its state under ``<prefix>:<run>:trainer:<stream>`` (``essp.training.resident``):
status (ready / training / epoch_done / stopped / failed), the last finished epoch and its figures.
The trigger fires when every watched stream has finished the epoch, when one has failed, when a
local trainer process has died (the embedded default; in Kubernetes the Deployment restarts it and
it resumes from its checkpoint), when the run is stopped (``essp control stop``), or when the
timeout passes; while the run is paused the timeout does not run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from essp.contract import RedisKeys

POLL_S = 1.0
MIN_FIRE_S = 8.0


class EpochDoneTrigger(BaseTrigger):
    """Fires once every stream in ``streams`` of ``run`` has finished ``epoch`` (or something failed).

    :param redis: ``host``, ``port``, ``db``, ``password`` (Airflow stores trigger kwargs encrypted)
        and ``prefix`` of the run's Redis.
    :param state_dir: the local state folder whose process table holds the run's trainers, or None
        (Kubernetes: no process to watch).
    :param carry: small JSON put into every event as ``carry``, for the task that resumes.
    """

    def __init__(self, *, run: str, streams: list[str], epoch: int, redis: dict[str, Any], timeout_s: float,
                 state_dir: str | None = None, poll_s: float = POLL_S, started: float | None = None,
                 carry: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.essp_run = run
        self.streams = list(streams)
        self.epoch = int(epoch)
        self.redis = dict(redis)
        self.timeout_s = float(timeout_s)
        self.state_dir = state_dir
        self.poll_s = float(poll_s)
        # Wall-clock start, kept across a triggerer restart (the trigger is rebuilt from serialize()).
        self.started = float(started) if started is not None else time.time()
        # Echoed in every event: what the resumed task needs (dag.test() hands it the event alone).
        self.carry = dict(carry or {})

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"run": self.essp_run, "streams": self.streams, "epoch": self.epoch, "redis": self.redis,
                 "timeout_s": self.timeout_s, "state_dir": self.state_dir, "poll_s": self.poll_s,
                 "started": self.started, "carry": self.carry})

    def _dead_trainer(self, stream: str) -> str | None:
        """The end of the log of the run's local trainer of ``stream`` if its process is gone."""
        if not self.state_dir:
            return None
        from pathlib import Path

        from essp.deploy.fleet import trainer_name
        from essp.stack.procs import ProcessTable

        table = ProcessTable(Path(self.state_dir))
        name = trainer_name(self.essp_run, stream)
        if not table.pidfile(name).exists() or table.record(name) is not None:
            return None  # not started by this state folder, or alive
        return table.tail(name, 30)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import redis.asyncio as aioredis

        keys = RedisKeys(self.redis.get("prefix", "essp"))
        client = aioredis.Redis(host=self.redis["host"], port=int(self.redis["port"]), db=int(self.redis.get("db", 0)),
                                password=self.redis.get("password") or None, socket_connect_timeout=5,
                                socket_timeout=30)
        base = {"run": self.essp_run, "epoch": self.epoch, "carry": self.carry}
        paused_s = 0.0
        try:
            while True:
                try:
                    run_state = (await client.get(keys.run_state(self.essp_run)) or b"running").decode()
                except Exception:  # noqa: BLE001 - Redis away: the loop below says so
                    run_state = "running"
                if run_state == "stopped":
                    yield TriggerEvent({**base, "status": "stopped",
                                        "detail": f"run {self.essp_run} was stopped (essp control stop); the trainers "
                                                  "checkpointed where they were; trigger a new run to resume"})
                    return
                if run_state == "paused":  # a paused run waits as long as it takes: no timeout runs
                    paused_s += self.poll_s
                    await asyncio.sleep(self.poll_s)
                    continue
                done: dict[str, Any] = {}
                for stream in self.streams:
                    try:
                        raw = await client.get(keys.trainer(self.essp_run, stream))
                    except Exception as exc:  # noqa: BLE001 - Redis restarting: keep waiting, say so
                        self.log.warning("Redis unreachable while waiting for %s: %s", self.essp_run, exc)
                        break
                    state = json.loads(raw) if raw else {}
                    if state.get("status") == "failed":
                        yield TriggerEvent({**base, "status": "failed", "stream": stream,
                                            "detail": f"the {stream} trainer failed: {state.get('detail')}"})
                        return
                    if int(state.get("epoch_done", -1)) >= self.epoch:
                        done[stream] = state.get("stats", {})
                        continue
                    tail = self._dead_trainer(stream)
                    if tail is not None:
                        yield TriggerEvent({**base, "status": "failed", "stream": stream,
                                            "detail": f"the {stream} trainer process of run {self.essp_run} exited "
                                                      f"before finishing epoch {self.epoch}; its log ends:\n{tail}"})
                        return
                if len(done) == len(self.streams):
                    # Not sooner than MIN_FIRE_S after the task deferred: Airflow's scheduler fails a task
                    # whose resumed run is already going when the report of its deferring run arrives
                    # late (seen here on a busy 2-core machine, ~5 s after a tiny epoch). Real epochs
                    # take longer than this.
                    early = MIN_FIRE_S - (time.time() - self.started)
                    if early > 0:
                        await asyncio.sleep(early)
                    yield TriggerEvent({**base, "status": "done", "stats": done})
                    return
                if time.time() - self.started - paused_s > self.timeout_s:
                    missing = sorted(set(self.streams) - set(done))
                    yield TriggerEvent({**base, "status": "timeout", "stream": ",".join(missing),
                                        "detail": f"epoch {self.epoch} of run {self.essp_run} not finished by "
                                                  f"{', '.join(missing)} after {self.timeout_s:.0f}s"})
                    return
                await asyncio.sleep(self.poll_s)
        finally:
            await client.aclose()
