"""The resident workers a training run needs, kept at the wanted number: the "ensure workers" and
"release workers" steps of the `essp_train` DAG.

Two places, one interface (the setting ``ESSP_WORKER_MODE``, by default the stage mode):

- **local** (the embedded default): detached processes started by :mod:`essp.deploy.local`, so they
  outlive the Airflow task that started them. The data workers are shared by every run and named
  ``worker-decode-<i>`` / ``worker-extract-<kind>-<i>``; each run has one trainer per stream,
  ``trainer-<run>-<stream>`` (``essp worker train --run --stream --nproc``).
- **kubernetes**: the Deployments of ``k8s/`` are scaled (``essp.deploy.kube.KubeWorkers``), and each run's
  trainers are Deployments cloned from the ``essp-trainer`` template.

Scaling a kind down stops the highest-numbered workers: a worker that gets SIGTERM hands its
partitions back and its unfinished samples are redelivered (the data plane's at-least-once promise).
"""

from __future__ import annotations

import fcntl
from typing import Any

from essp.dataplane.extractors import extractor_kinds
from essp.deploy.local import (
    LaunchError,
    LocalProcess,
    LocalProcesses,
    live_worker_indexes,
    trainer_args,
    trainer_name,
    worker_args,
    worker_name,
)
from essp.errors import EsspError
from essp.settings import Settings


class FleetError(EsspError):
    """A worker could not be started, stopped or scaled; the message names it and why."""


def data_kinds() -> list[str]:
    """Kinds of shared data workers: the decoder and every registered extractor."""
    return ["decode", *extractor_kinds()]


def check_replicas(replicas: dict[str, int]) -> dict[str, int]:
    kinds = data_kinds()
    out = {}
    for kind, count in replicas.items():
        if kind not in kinds:
            raise FleetError(f"replicas: {kind!r} is not a worker kind ({', '.join(kinds)})")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 256:
            raise FleetError(f"replicas.{kind}: {count!r} is not a number of workers between 0 and 256")
        out[kind] = count
    return out


def worker_mode(settings: Settings) -> str:
    return settings.worker_mode or settings.stage_mode


class LocalFleet:
    """Resident workers as detached local processes of this machine (see the module's doc)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes = LocalProcesses(settings)

    def _live(self, kind: str) -> set[int]:
        """Indexes of this kind's workers that run in this scope."""
        return live_worker_indexes(self.processes.table, kind, lambda scope: scope in (None, self.processes.scope))

    def running(self, kind: str) -> list[str]:
        return [worker_name(kind, i) for i in sorted(self._live(kind))]

    def _start(self, commands: list[tuple[str, list[str]]]) -> None:
        try:
            self.processes.start(commands)
        except LaunchError as exc:
            raise FleetError(str(exc)) from None

    def scale(self, replicas: dict[str, int], *, at_least: bool = False) -> dict[str, dict[str, Any]]:
        """Start or stop shared data workers until each kind has its count (``at_least``: never stop one);
        returns what was done. One scaling at a time per state folder (a file lock): the train tasks of
        a run's streams may both start a crashed worker again at once."""
        self.processes.table.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.processes.table.run_dir / "fleet.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._scale(replicas, at_least=at_least)

    def _scale(self, replicas: dict[str, int], *, at_least: bool) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        commands: list[tuple[str, list[str]]] = []
        for kind, wanted in check_replicas(replicas).items():
            live = self._live(kind)
            new, stopped = [], []
            index = 0
            while len(live) + len(new) < wanted:
                name = worker_name(kind, index)
                if index not in live and not self.processes.taken(name):  # another scope's worker keeps its name
                    commands.append((name, worker_args(kind)))
                    new.append(name)
                index += 1
            surplus = [] if at_least else sorted(live, reverse=True)[: max(0, len(live) - wanted)]
            for index in surplus:
                process = self.processes.find(worker_name(kind, index))
                if process is not None:
                    process.stop()
                stopped.append(worker_name(kind, index))
            result[kind] = {"wanted": wanted, "started": new, "stopped": stopped}
        self._start(commands)
        for kind in result:
            result[kind]["running"] = len(self.running(kind))
        return result

    def ensure_trainer(self, run: str, stream: str, nproc: int = 1) -> dict[str, Any]:
        name = trainer_name(run, stream)
        found = self.processes.find(name)
        if found is not None:
            return {"trainer": name, "pid": found.pid, "started": False}
        self._start([(name, trainer_args(run, stream, nproc))])
        found = self.processes.find(name)
        return {"trainer": name, "pid": found.pid if found else None, "started": True}

    def trainer(self, run: str, stream: str) -> LocalProcess | None:
        return self.processes.find(trainer_name(run, stream))

    def release_trainer(self, run: str, stream: str) -> bool:
        found = self.trainer(run, stream)
        if found is None:
            return False
        found.stop(timeout_s=60)
        return True

    def stop_all(self) -> list[str]:
        """Stop every worker and trainer this state folder started, whatever their scope (`essp infra down`)."""
        stopped = []
        table = self.processes.table
        for pidfile in sorted(table.run_dir.glob("*.pid")) if table.run_dir.exists() else []:
            name = pidfile.stem
            if name.startswith(("worker-", "trainer-")) and table.stop(name, timeout_s=60):
                stopped.append(name)
        return stopped


def ensure_workers(settings: Settings, run: str, streams: list[str], replicas: dict[str, int], *,
                   trainer_procs: int | dict[str, int] = 1, gpus: bool = False) -> dict[str, Any]:
    """Scale the data workers to ``replicas`` and start the run's trainer of each stream (``trainer_procs``
    processes each, or per stream)."""
    procs = trainer_procs if isinstance(trainer_procs, dict) else {s: trainer_procs for s in streams}
    for stream in streams:
        if stream not in extractor_kinds():
            raise FleetError(f"streams: {stream!r} is not an extractor ({', '.join(extractor_kinds())})")
        if replicas.get(stream, 1) < 1:
            raise FleetError(f"replicas.{stream}: the run trains stream {stream!r}, so it needs at least one "
                             f"{stream} extractor")
    if replicas.get("decode", 1) < 1:
        raise FleetError("replicas.decode: a run needs at least one decode worker")
    if worker_mode(settings) == "kubernetes":
        from essp.deploy.kube import KubeWorkers

        kube = KubeWorkers(settings.k8s_namespace)
        scaled = {kind: kube.scale(kind, count) for kind, count in check_replicas(replicas).items()}
        trainers = {s: kube.ensure_trainer(run, s, nproc=procs.get(s, 1), gpus=gpus) for s in streams}
        return {"mode": "kubernetes", "workers": scaled, "trainers": trainers}
    fleet = LocalFleet(settings)
    scaled = fleet.scale(replicas)
    trainers = {s: fleet.ensure_trainer(run, s, nproc=procs.get(s, 1)) for s in streams}
    return {"mode": "local", "workers": scaled, "trainers": trainers}


def release_trainers(settings: Settings, run: str, streams: list[str]) -> dict[str, Any]:
    """Stop the run's trainers (their checkpoints are in S3): what scoring needs the cores back from."""
    return release_workers(settings, run, streams)


def release_workers(settings: Settings, run: str, streams: list[str], *,
                    data_workers: dict[str, int] | None = None) -> dict[str, Any]:
    """Stop the run's trainers; with ``data_workers`` also scale the shared workers (e.g. to 0)."""
    if worker_mode(settings) == "kubernetes":
        from essp.deploy.kube import KubeWorkers

        kube = KubeWorkers(settings.k8s_namespace)
        released = {s: kube.delete_trainer(run, s) for s in streams}
        scaled = {k: kube.scale(k, n) for k, n in check_replicas(data_workers or {}).items()}
        return {"mode": "kubernetes", "trainers": released, "workers": scaled}
    fleet = LocalFleet(settings)
    released = {s: fleet.release_trainer(run, s) for s in streams}
    scaled = fleet.scale(data_workers) if data_workers else {}
    return {"mode": "local", "trainers": released, "workers": scaled}
