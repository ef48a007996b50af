"""The one way ESSP starts a local resident process: a decode or extractor worker, or a trainer.

Each is an `essp worker ...` process started detached in its own session, with the settings it was
given (as ``ESSP_*`` variables: the credentials of Redis and S3, not Airflow's), its PID file and log in
the state folder (:class:`~essp.stack.procs.ProcessTable`, so it outlives the Airflow task that started it
and `essp infra down` stops it), and it is ready when the worker itself says so: it writes the file
``ESSP_READY_FILE`` names once it serves (:func:`essp.dataplane.resident.mark_ready`). The fleet
(:mod:`essp.deploy.fleet`), `essp train`, the benchmarks and the tests all start workers here;
``--replicas`` and DDP ranks are the child processes of one such command (:func:`supervise`).

One naming scheme: data workers are ``worker-decode-<i>`` and ``worker-extract-<kind>-<i>``, a run's
trainer of one stream is ``trainer-<run>-<stream>``; the name is also the worker's id in its events.
A PID file records the services and prefixes the worker serves (its scope), so workers of isolated
settings (tests, benchmarks) in the same state folder are never mistaken for each other.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from essp.errors import EsspError
from essp.settings import Settings, worker_environ
from essp.stack.procs import ProcessRecord, ProcessTable, terminate

READY_TIMEOUT_S = 120.0


class LaunchError(EsspError):
    """A resident process could not be started or did not get ready; the message names it and why."""


def worker_name(kind: str, index: int) -> str:
    """The name of the ``index``-th data worker of ``kind`` (decode or an extractor kind)."""
    return f"worker-decode-{index}" if kind == "decode" else f"worker-extract-{kind}-{index}"


def is_worker_name(name: str) -> bool:
    """Whether ``name`` is a data worker's (decode or any extractor kind)."""
    return re.fullmatch(r"worker-(decode|extract-[a-z][a-z0-9_]*)-\d+", name) is not None


def scope_digest(scope: str) -> str:
    """A short digest of a scope (:func:`scope_of`), for where its addresses should not be shown (an
    Airflow trigger's kwargs, which Airflow's REST API returns)."""
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


def live_worker_indexes(table: ProcessTable, kind: str, in_scope: Callable[[str | None], bool]) -> set[int]:
    """Indexes of the data workers of ``kind`` alive now, by the table's PID files, whose scope label
    ``in_scope`` accepts (None: a process recorded without one)."""
    prefix = worker_name(kind, 0)[:-1]
    run_dir = table.run_dir
    found = set()
    for pidfile in sorted(run_dir.glob(f"{prefix}*.pid")) if run_dir.exists() else []:
        index = pidfile.stem[len(prefix):]  # not digits: another kind (worker-extract-flowx-0 for flow)
        if index.isdigit() and (record := table.record(pidfile.stem)) is not None \
                and in_scope(record.labels.get("scope")):
            found.add(int(index))
    return found


def running_workers(table: ProcessTable, kind: str, digest: str) -> int:
    """How many data workers of ``kind`` run now in the scope of that :func:`scope_digest` (what the epoch
    trigger counts to see one that crashed; it has the digest, not the settings)."""
    return len(live_worker_indexes(table, kind, lambda scope: scope is None or scope_digest(scope) == digest))


def worker_args(kind: str) -> list[str]:
    return ["decode"] if kind == "decode" else ["extract", "--kind", kind]


def trainer_name(run: str, stream: str) -> str:
    return f"trainer-{run}-{stream}"


def trainer_args(run: str, stream: str, nproc: int = 1) -> list[str]:
    return ["train", "--run", run, "--stream", stream, "--nproc", str(nproc)]


def scope_of(settings: Settings) -> str:
    """Which services and prefixes a worker started with these settings serves."""
    return (f"redis={settings.redis_host}:{settings.redis_port}/{settings.redis_db}/{settings.redis_prefix} "
            f"kafka={settings.kafka_bootstrap}/{settings.topic_prefix} "
            f"s3={settings.s3_endpoint}/{settings.bucket_videos}")


def resident_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a resident process: the settings it was given (a stage's come from Airflow's
    connections), without Airflow's own credentials and configuration (:func:`essp.settings.worker_environ`:
    the starter may be an Airflow task); no .pyc writes, since the data plane writes nothing to disk."""
    return {**worker_environ({**os.environ, **settings.as_env()}), "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1", **extra}


def resident_argv(args: list[str], worker_id: str) -> list[str]:
    return [sys.executable, "-m", "essp.cli", "worker", *args, "--worker-id", worker_id]


@dataclass
class LocalProcess:
    """A started (or found) resident process."""

    name: str
    record: ProcessRecord
    table: ProcessTable

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def log_path(self) -> Path:
        return self.table.log(self.name)

    def alive(self) -> bool:
        return self.record.alive

    def returncode(self) -> int | None:
        """The exit status once it has exited, when this Python process started it (else None)."""
        return self.table.exited_early(self.record)

    def wait(self, timeout_s: float = 30.0) -> int | None:
        """Wait until it exits; its exit status when known."""
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.name} (pid {self.pid}) still runs after {timeout_s:.0f}s")
            time.sleep(0.1)
        self.table.pidfile(self.name).unlink(missing_ok=True)
        return self.returncode()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (its own handler checkpoints or hands work back), SIGKILL after ``timeout_s``."""
        code = terminate(self.pid, self.record.start_ticks, timeout_s) if self.alive() else self.returncode()
        self.table.pidfile(self.name).unlink(missing_ok=True)
        return code

    def kill(self) -> None:
        """SIGKILL, no goodbye (fault tests)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.wait(10)

    def tail(self, lines: int = 30) -> str:
        return self.table.tail(self.name, lines)


def stop_together(processes: list[LocalProcess], timeout_s: float = 30.0) -> None:
    """Stop them all at once, each as :meth:`LocalProcess.stop` does: the slowest sets the time taken, not
    the sum (a trainer that checkpoints and a data worker that hands back its chunk take a second or two each)."""
    threads = [threading.Thread(target=p.stop, kwargs={"timeout_s": timeout_s}, name=f"essp-stop-{p.name}")
               for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class LocalProcesses:
    """Resident processes of one state folder (by default the settings'), in the settings' scope."""

    def __init__(self, settings: Settings, *, state_dir: Path | None = None) -> None:
        self.settings = settings
        self.table = ProcessTable(state_dir or settings.state_dir)
        self.scope = scope_of(settings)

    def ready_file(self, name: str) -> Path:
        return self.table.run_dir / f"{name}.ready"

    def find(self, name: str) -> LocalProcess | None:
        """The live process of that name, in this scope (another scope's is not ours: None)."""
        record = self.table.record(name)
        if record is None or record.labels.get("scope", self.scope) != self.scope:
            return None
        return LocalProcess(name, record, self.table)

    def taken(self, name: str) -> bool:
        """Whether a live process of any scope holds the name."""
        return self.table.record(name) is not None

    def names(self, prefix: str) -> list[str]:
        """Live processes of this scope whose names start with ``prefix``."""
        run_dir = self.table.run_dir
        pidfiles = sorted(run_dir.glob(f"{prefix}*.pid")) if run_dir.exists() else []
        return [p.stem for p in pidfiles if self.find(p.stem) is not None]

    def start(self, commands: list[tuple[str, list[str]]], *,
              timeout_s: float = READY_TIMEOUT_S) -> list[LocalProcess]:
        """Start each (name, `essp worker` arguments), then wait until every one is ready; if one exits or
        does not get ready in time, stop all of them and raise with its log's end."""
        started = []
        try:
            for name, args in commands:
                if self.taken(name):
                    raise LaunchError(f"{name}: a process of that name already runs "
                                      f"(pid {self.table.record(name).pid})")  # type: ignore[union-attr]
                self.ready_file(name).unlink(missing_ok=True)
                env = resident_env(self.settings, ESSP_READY_FILE=str(self.ready_file(name)))
                record = self.table.spawn(name, resident_argv(args, name), env=env, labels={"scope": self.scope})
                started.append(LocalProcess(name, record, self.table))
            self._wait_ready(started, timeout_s)
        except BaseException:
            for process in started:
                process.stop(timeout_s=10)
            raise
        return started

    def _wait_ready(self, processes: list[LocalProcess], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(processes)
        while pending:
            for process in list(pending):
                if self.ready_file(process.name).exists():
                    pending.remove(process)
                elif not process.alive():
                    code = process.returncode()
                    raise LaunchError(f"worker {process.name} exited while starting"
                                      f"{f' (exit status {code})' if code is not None else ''}; its log "
                                      f"({process.log_path}) ends:\n{process.tail(30)}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise LaunchError(f"worker(s) {names} did not get ready within {timeout_s:.0f}s; the first log "
                                  f"ends:\n{pending[0].tail(30)}")
            if pending:
                time.sleep(0.1)


def supervise(commands: list[tuple[list[str], dict[str, str] | None]]) -> int:
    """Run each (`essp` arguments, environment) as a child process of this one (the replicas of one
    worker command, the ranks of one DDP trainer); SIGTERM/SIGINT reach them all. Returns when every one
    has exited, with the worst exit status."""
    children = [subprocess.Popen([sys.executable, "-m", "essp.cli", *argv], env=env) for argv, env in commands]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)

