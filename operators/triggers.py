"""Deferrable waits of the ESSP DAGs: the triggerer watches the trainers' state in Redis, so no
Airflow worker slot sleeps while an epoch trains.

A trainer records its state (:class:`essp.contract.TrainerState`) under ``<prefix>:<run>:trainer:<stream>``;
whether the epoch is over is :func:`essp.contract.epoch_progress`, the judgement the pipeline and the UI
share. The trigger fires when every watched stream has finished the epoch, when one has failed, when a
local trainer process has died (the embedded default; in Kubernetes the Deployment restarts it and it
resumes from its checkpoint), when fewer local data workers run than the run wants (``keep``: one
crashed; the task starts it again, as a Deployment would, and waits on), when a trainer is dead by its
heartbeats (its live key expired: :func:`essp.lifecycle.liveness.silent_trainers`, any deployment), when
the run is stopped (``essp control stop``), or when the timeout passes. In Kubernetes (``namespace``)
it also reads the trainer pods every ``BLOCKER_CHECK_S`` and logs why one does not run (not schedulable,
its image missing, ...: :func:`essp.deploy.kube.trainer_blockers`) as soon as it is seen; a timeout says
it too. It does not fail the task for it: a cluster autoscaler may add the node, or a user the image.
The timeout leaves out the run's paused time, read from the run's pause ledger in Redis
(:mod:`essp.lifecycle.liveness`), not counted by the trigger itself: a triggerer restarted during a long
pause rebuilds the trigger, which reads the same ledger and the same start. Redis comes from an Airflow
connection id (the trigger's kwargs are stored in Airflow's database: no credential goes there).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from essp.connections import REDIS_CONN_ID
from essp.contract import TRAINER_STATE_TTL_S, RedisKeys, TrainerState, epoch_progress
from essp.deploy.local import running_workers, trainer_name
from essp.lifecycle.liveness import PAUSE_LEDGER, live_keys, silent_trainers
from essp.operators.hooks import redis_client
from essp.stack.procs import ProcessTable

POLL_S = 1.0
MIN_FIRE_S = 8.0
BLOCKER_CHECK_S = 30.0


class EpochDoneTrigger(BaseTrigger):
    """Fires once every stream in ``streams`` of ``run`` has finished ``epoch`` (or the epoch ended otherwise).

    :param redis_conn_id: the Airflow connection of the run's Redis (its extras carry the key prefix).
    :param state_dir: the local state folder whose process table holds the run's trainers, or None
        (Kubernetes: no process to watch).
    :param carry: small JSON put into every event as ``carry``, for the task that resumes.
    :param keep: data workers per kind that the run wants running in the scope whose digest is ``scope``
        (:func:`essp.deploy.local.scope_digest`; local only; None: not watched); fewer fire the event
        ``short``, naming them.
    :param namespace: the namespace of the run's trainer pods (Kubernetes worker mode), or None.
    :param started: when the wait began (wall clock); ``paused_base``: the run's paused seconds in all
        (its pause ledger) then. Both are kept across a triggerer restart (they are in serialize()), so the
        timeout counts the time since ``started`` less what the ledger gained since.
    """

    def __init__(self, *, run: str, streams: list[str], epoch: int, timeout_s: float,
                 redis_conn_id: str = REDIS_CONN_ID, state_dir: str | None = None, poll_s: float = POLL_S,
                 started: float | None = None, paused_base: float = 0.0,
                 carry: dict[str, Any] | None = None, keep: dict[str, int] | None = None,
                 scope: str | None = None, namespace: str | None = None) -> None:
        super().__init__()
        self.keep = {str(k): int(v) for k, v in (keep or {}).items() if int(v) > 0}
        self.scope = scope
        self.namespace = namespace
        self._blockers: dict[str, str] = {}
        self._blockers_at: float | None = None  # when the pods were last read (monotonic clock)
        self.essp_run = run
        self.streams = list(streams)
        self.epoch = int(epoch)
        self.redis_conn_id = redis_conn_id
        self.timeout_s = float(timeout_s)
        self.state_dir = state_dir
        self.poll_s = float(poll_s)
        # Wall-clock start, kept across a triggerer restart (the trigger is rebuilt from serialize()).
        self.started = float(started) if started is not None else time.time()
        self.paused_base = float(paused_base)
        # Echoed in every event: what the resumed task needs (dag.test() hands it the event alone).
        self.carry = dict(carry or {})

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"run": self.essp_run, "streams": self.streams, "epoch": self.epoch,
                 "redis_conn_id": self.redis_conn_id, "timeout_s": self.timeout_s, "state_dir": self.state_dir,
                 "poll_s": self.poll_s, "started": self.started, "paused_base": self.paused_base,
                 "carry": self.carry, "keep": self.keep, "scope": self.scope, "namespace": self.namespace})

    def _gone(self, table: ProcessTable | None) -> dict[str, str]:
        """The streams whose local trainer process is gone, with the end of its log."""
        if table is None:
            return {}
        found = {stream: table.exited_tail(trainer_name(self.essp_run, stream)) for stream in self.streams}
        return {stream: tail for stream, tail in found.items() if tail is not None}

    def _short(self, table: ProcessTable | None) -> str | None:
        """The kinds with fewer local data workers running than ``keep`` wants, as "decode 1 of 2"."""
        if table is None or not self.keep or self.scope is None:
            return None
        short = [f"{kind} {live} of {wanted}" for kind, wanted in self.keep.items()
                 if (live := running_workers(table, kind, self.scope)) < wanted]
        return ", ".join(short) or None

    async def _check_pods(self, waiting: list[str]) -> None:
        """Every BLOCKER_CHECK_S in Kubernetes: why the waiting streams' trainer pods do not run, logged when
        it changes and kept for a timeout's detail."""
        if not self.namespace or not waiting:
            return
        if self._blockers_at is not None and time.monotonic() - self._blockers_at < BLOCKER_CHECK_S:
            return
        self._blockers_at = time.monotonic()
        from essp.deploy.kube import trainer_blockers

        try:
            found = await asyncio.to_thread(trainer_blockers, self.namespace, self.essp_run, waiting)
        except Exception as exc:  # noqa: BLE001 - the API unreachable: the wait goes on, says so
            self.log.warning("Could not read the trainer pods of run %s: %s", self.essp_run, exc)
            return
        for stream, why in sorted(found.items()):
            if self._blockers.get(stream) != why:
                self.log.warning("The %s trainer of run %s does not run: %s", stream, self.essp_run, why)
        self._blockers = found

    async def run(self) -> AsyncIterator[TriggerEvent]:
        client, prefix = await redis_client(self.redis_conn_id)
        keys = RedisKeys(prefix)
        table = ProcessTable(Path(self.state_dir)) if self.state_dir else None
        base = {"run": self.essp_run, "epoch": self.epoch, "carry": self.carry}
        try:
            while True:
                try:
                    run_state = (await client.get(keys.run_state(self.essp_run)) or b"running").decode()
                    raws = await client.mget([keys.trainer(self.essp_run, s) for s in self.streams])
                    states = {s: TrainerState.parse(raw) for s, raw in zip(self.streams, raws, strict=True)}
                    lives = live_keys(states, keys)
                    found = await client.mget(list(lives.values())) if lives else []
                    paused_s = float(await client.eval(PAUSE_LEDGER, 1, keys.pauses(self.essp_run), run_state,
                                                       TRAINER_STATE_TTL_S)) - self.paused_base
                except Exception as exc:  # noqa: BLE001 - Redis restarting: keep waiting, say so
                    self.log.warning("Redis unreachable while waiting for %s: %s", self.essp_run, exc)
                    await asyncio.sleep(self.poll_s)
                    continue
                live = {stream: value is not None for stream, value in zip(lives, found, strict=True)}
                gone = {**silent_trainers(states, live, self.epoch), **self._gone(table)}
                overdue = time.time() - self.started - paused_s > self.timeout_s
                progress = epoch_progress(self.essp_run, self.epoch, states, run_state=run_state,
                                          gone=gone, overdue_s=self.timeout_s if overdue else None)
                if progress.status == "done":
                    # Not sooner than MIN_FIRE_S after the task deferred: Airflow's scheduler fails a task
                    # whose resumed run is already going when the report of its deferring run arrives
                    # late (seen here on a busy 2-core machine, ~5 s after a tiny epoch). Real epochs
                    # take longer than this.
                    early = MIN_FIRE_S - (time.time() - self.started)
                    if early > 0:
                        await asyncio.sleep(early)
                    yield TriggerEvent({**base, "status": "done", "stats": progress.done})
                    return
                if progress.over:
                    # a trainer gone before the epoch's end fails the task as a failed trainer does
                    status = "failed" if progress.status == "stalled" else progress.status
                    detail = progress.detail
                    if status == "timeout" and self._blockers:
                        detail += "; the trainer pods: " + "; ".join(
                            f"{stream}: {why}" for stream, why in sorted(self._blockers.items()))
                    yield TriggerEvent({**base, "status": status, "stream": progress.stream, "detail": detail})
                    return
                short = self._short(table) if run_state == "running" else None
                if short:
                    yield TriggerEvent({**base, "status": "short", "detail": f"data workers running: {short}"})
                    return
                await self._check_pods(progress.waiting)
                await asyncio.sleep(self.poll_s)  # paused: the ledger holds the timeout, however long
        finally:
            await client.aclose()
