"""A retried ``train`` task after a trainer died mid-epoch (issue 11, fault 8): the dead trainer is started
again (it resumes from the run's latest checkpoint of its stream) and the epoch is delivered again.

What the dead trainer's :class:`~essp.dataplane.consumer.SampleStream` had taken is gone for good: it read
those ready notices (and committed them), took their payloads out of Redis and held them in its prefetch
queue. The new trainer's stream reads on from the committed offsets and would wait for samples that
never come. So the retry plans the epoch again (the same samples: the plan is seeded), which forgets
the samples' progress (:meth:`~essp.dataplane.payloads.SampleStore.reset`) and publishes them again;
the live trainers of the other streams drop what they already had (a stream yields a sample once an
epoch). Exactly one task of the DAG run re-plans for one set of dead trainers: the re-plan's token names
them (:func:`essp.lifecycle.epochs.plan_epoch_once`).
"""

from __future__ import annotations

import time
from typing import Any

from essp.clients.redis import redis_client
from essp.contract import RedisKeys, TrainerState
from essp.deploy.fleet import LocalFleet, worker_mode
from essp.lifecycle.allocation import current_slots
from essp.lifecycle.epochs import Log, plan_epoch_once, trainer_states
from essp.lifecycle.liveness import TRAINER_SILENT_S
from essp.lifecycle.params import RunParams
from essp.settings import Settings


def dead_trainers(settings: Settings, spec: RunParams, epoch: int) -> dict[str, str]:
    """The streams whose trainer recorded a state short of ``epoch``'s end and is not running any more,
    each with the worker id its state names. Local trainers are judged by their process, others by their
    live key (heartbeats) and the age of their state."""
    run = spec.run_id()
    states = trainer_states(settings, run, spec.streams)
    local = worker_mode(settings) == "local"
    fleet = LocalFleet(settings) if local else None
    dead = {}
    for stream, state in states.items():
        if state is None or state.finished(epoch) or not state.worker:
            continue  # never started (nothing taken), or done with the epoch
        alive = fleet.trainer(run, stream) is not None if fleet is not None else _heartbeating(settings, state)
        if not alive:
            dead[stream] = state.worker
    return dead


def _heartbeating(settings: Settings, state: TrainerState) -> bool:
    assert state.worker is not None
    if redis_client(settings).exists(RedisKeys(settings.redis_prefix).worker(state.worker)):
        return True
    return time.time() - (state.updated_at or 0.0) <= TRAINER_SILENT_S


def ensure_trainer(settings: Settings, spec: RunParams, stream: str) -> dict[str, Any]:
    """Start the run's trainer of ``stream`` unless it runs (local), or make sure its Deployment exists."""
    run = spec.run_id()
    nproc = current_slots(settings, spec)[stream]  # as the allocation left it (essp.lifecycle.allocation)
    if worker_mode(settings) == "kubernetes":
        from essp.deploy.kube import KubeWorkers

        gpus = settings.k8s_trainer_gpus and spec.device != "cpu"
        return KubeWorkers(settings.k8s_namespace).ensure_trainer(run, stream, nproc=nproc, gpus=gpus)
    return LocalFleet(settings).ensure_trainer(run, stream, nproc=nproc)


def recover_epoch(settings: Settings, spec: RunParams, epoch: int, *, stream: str, token: str, planner: str,
                  log: Log = print) -> dict[str, Any]:
    """What a retried train task of ``stream`` does before it waits for ``epoch`` again: if any stream's
    trainer died before finishing the epoch, start it again and plan the epoch again (once per set of
    dead trainers: the task that takes the re-plan's lease does both, the others wait for it); then start
    its own trainer if it is not there."""
    run = spec.run_id()
    dead = dead_trainers(settings, spec, epoch)  # before restarting: the new trainer's state hides the dead one
    started: dict[str, Any] = {}

    def restart() -> None:
        for name in sorted(dead):
            started[name] = ensure_trainer(settings, spec, name)
            log(f"started the {name} trainer of run {run} again ({started[name].get('trainer')}): it resumes "
                "from the run's latest checkpoint of its stream")

    replanned = False
    if dead:
        names = ", ".join(f"{s} ({w})" for s, w in sorted(dead.items()))
        redeliver = f"{token}/redeliver/{','.join(sorted(dead.values()))}"
        replanned = plan_epoch_once(settings, spec, epoch, redeliver, planner=planner, before=restart)
        what = "planned and published it again" if replanned else "another task of this DAG run re-planned it"
        log(f"epoch {epoch} of run {run}: the trainer of {names} died before finishing it; {what} (the samples "
            "it had taken are delivered again)")
    own = ensure_trainer(settings, spec, stream)
    if own.get("started"):
        log(f"started the {stream} trainer of run {run} ({own.get('trainer')})")
    return {"dead": dead, "restarted": sorted(started), "replanned": replanned}
