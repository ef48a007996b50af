"""The resident workers a training run needs, kept at the wanted number: the "ensure workers" and
"release workers" steps of the `essp_train` DAG.

Two places, one interface (the setting ``ESSP_WORKER_MODE``, by default the stage mode):

- **local** (the embedded default): detached processes recorded in the state folder's process table
  (``essp.stack.procs.ProcessTable``), so they outlive the Airflow task that started them. The data workers
  are shared by every run and named ``worker-decode-<i>`` / ``worker-extract-<kind>-<i>``; each run has
  one trainer per stream, ``trainer-<run>-<stream>`` (``essp worker train --run --stream --nproc``).
- **kubernetes**: the Deployments of ``k8s/`` are scaled (``essp.deploy.kube.KubeWorkers``), and each run's
  trainers are Deployments cloned from the ``essp-trainer`` template.

Scaling a kind down stops the highest-numbered workers: a worker that gets SIGTERM hands its
partitions back and its unfinished samples are redelivered (the data plane's at-least-once promise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from essp.dataplane.extractors import extractor_kinds
from essp.errors import EsspError
from essp.settings import Settings
from essp.stack.procs import ProcessTable
from essp.stack.services import venv_binary

START_TIMEOUT_S = 120.0
SERVING_MARK = b"serving"


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


def worker_name(kind: str, index: int) -> str:
    return f"worker-decode-{index}" if kind == "decode" else f"worker-extract-{kind}-{index}"


def worker_args(kind: str) -> list[str]:
    return ["decode"] if kind == "decode" else ["extract", "--kind", kind]


def trainer_name(run: str, stream: str) -> str:
    return f"trainer-{run}-{stream}"


def worker_mode(settings: Settings) -> str:
    return settings.worker_mode or settings.stage_mode


@dataclass
class _Started:
    name: str
    log_offset: int


class LocalFleet:
    """Resident workers as detached local processes of this machine (see the module's doc)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.table = ProcessTable(settings.state_dir)

    def _env(self) -> dict[str, str]:
        import os

        # The workers get the settings they were started with, complete (a stage's come from Airflow's
        # connections); no .pyc writes: the data plane writes nothing to disk.
        return {**os.environ, **self.settings.as_env(), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def _spawn(self, name: str, args: list[str]) -> _Started:
        log = self.table.log(name)
        offset = log.stat().st_size if log.exists() else 0
        self.table.spawn(name, [venv_binary("essp"), "worker", *args, "--worker-id", name], env=self._env())
        return _Started(name, offset)

    def _wait_serving(self, started: list[_Started], timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(started)
        while pending:
            for item in list(pending):
                with self.table.log(item.name).open("rb") as log:
                    log.seek(item.log_offset)
                    if SERVING_MARK in log.read():
                        pending.remove(item)
                        continue
                if self.table.record(item.name) is None:
                    raise FleetError(f"worker {item.name} exited while starting; its log "
                                     f"({self.table.log(item.name)}) ends:\n{self.table.tail(item.name, 30)}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise FleetError(f"worker(s) {names} did not start serving within {timeout_s:.0f}s; "
                                 f"the first log ends:\n{self.table.tail(pending[0].name, 30)}")
            if pending:
                time.sleep(0.2)

    def _live(self, kind: str) -> set[int]:
        """Indexes of this kind's workers that run (stale PID files are dropped on the way)."""
        prefix = worker_name(kind, 0)[:-1]
        found = set()
        for pidfile in self.table.run_dir.glob(f"{prefix}*.pid") if self.table.run_dir.exists() else []:
            index = pidfile.stem[len(prefix):]
            if index.isdigit() and self.table.record(pidfile.stem) is not None:
                found.add(int(index))
        return found

    def running(self, kind: str) -> list[str]:
        return [worker_name(kind, i) for i in sorted(self._live(kind))]

    def scale(self, replicas: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Start or stop shared data workers until each kind has its count; returns what was done."""
        result: dict[str, dict[str, Any]] = {}
        started: list[_Started] = []
        for kind, wanted in check_replicas(replicas).items():
            live = self._live(kind)
            new, stopped = [], []
            index = 0
            while len(live) + len(new) < wanted:
                if index not in live:
                    item = self._spawn(worker_name(kind, index), worker_args(kind))
                    started.append(item)
                    new.append(item.name)
                index += 1
            for index in sorted(live, reverse=True)[: max(0, len(live) - wanted)]:
                self.table.stop(worker_name(kind, index))
                stopped.append(worker_name(kind, index))
            result[kind] = {"wanted": wanted, "started": new, "stopped": stopped}
        self._wait_serving(started)
        for kind in result:
            result[kind]["running"] = len(self.running(kind))
        return result

    def ensure_trainer(self, run: str, stream: str, nproc: int = 1) -> dict[str, Any]:
        name = trainer_name(run, stream)
        record = self.table.record(name)
        if record is not None:
            return {"trainer": name, "pid": record.pid, "started": False}
        item = self._spawn(name, ["train", "--run", run, "--stream", stream, "--nproc", str(nproc)])
        self._wait_serving([item])
        record = self.table.record(name)
        return {"trainer": name, "pid": record.pid if record else None, "started": True}

    def alive_trainer(self, run: str, stream: str) -> tuple[bool, str]:
        """Whether the run's trainer of ``stream`` runs, and the end of its log."""
        name = trainer_name(run, stream)
        return self.table.record(name) is not None, self.table.tail(name, 30)

    def release_trainer(self, run: str, stream: str) -> bool:
        return self.table.stop(trainer_name(run, stream), timeout_s=60)

    def stop_all(self) -> list[str]:
        """Stop every worker and trainer this state folder started (``essp infra down``)."""
        stopped = []
        run_dir = self.table.run_dir
        for pidfile in sorted(run_dir.glob("*.pid")) if run_dir.exists() else []:
            name = pidfile.stem
            if name.startswith(("worker-", "trainer-")) and self.table.stop(name, timeout_s=60):
                stopped.append(name)
        return stopped


def ensure_workers(settings: Settings, run: str, streams: list[str], replicas: dict[str, int], *,
                   trainer_procs: int = 1, gpus: bool = False) -> dict[str, Any]:
    """Scale the data workers to ``replicas`` and start the run's trainer of each stream."""
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
        trainers = {s: kube.ensure_trainer(run, s, nproc=trainer_procs, gpus=gpus) for s in streams}
        return {"mode": "kubernetes", "workers": scaled, "trainers": trainers}
    fleet = LocalFleet(settings)
    scaled = fleet.scale(replicas)
    trainers = {s: fleet.ensure_trainer(run, s, nproc=trainer_procs) for s in streams}
    return {"mode": "local", "workers": scaled, "trainers": trainers}


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
