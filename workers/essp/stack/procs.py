"""Background processes the local stack starts: spawn with a PID file, find, stop and wait.

A PID file records the PID, the program and the process's start time (in clock ticks since boot,
from /proc), so that `down` stops exactly the processes ESSP started — a recycled PID, which has
another start time, is never signalled — and waits until they have exited. (The command line is
no proof: Airflow and PostgreSQL rewrite theirs.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Popen objects of processes this Python process started, so they are reaped when they exit.
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    program: str
    log: str
    start_ticks: int | None = None
    labels: dict[str, str] = field(default_factory=dict)  # what the starter recorded about it (e.g. its scope)

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_ticks)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, the state, comes first)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22: starttime


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when ``start`` is given, is the process that
    started at that time rather than a later one that got the same PID."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


class ProcessTable:
    """PID files and logs of the processes started under one state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def record(self, name: str) -> ProcessRecord | None:
        """The live process started under ``name``, or None (a stale PID file is removed)."""
        path = self.pidfile(name)
        try:
            data = json.loads(path.read_text())
            record = ProcessRecord(name, int(data["pid"]), data["program"], data.get("log", ""),
                                   data.get("start_ticks"), dict(data.get("labels") or {}))
        except (OSError, ValueError, KeyError):
            return None
        if record.alive:
            return record
        path.unlink(missing_ok=True)
        return None

    def adopt(self, name: str, pid: int, program: str, log: Path | str = "",
              labels: dict[str, str] | None = None) -> ProcessRecord:
        """Record a process started by someone else on our behalf (a daemonising tool)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = ProcessRecord(name, pid, program, str(log), start_ticks(pid), dict(labels or {}))
        tmp = self.pidfile(name).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": pid, "program": program, "log": str(log),
                                   "start_ticks": record.start_ticks, "labels": record.labels}))
        tmp.replace(self.pidfile(name))
        return record

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None, labels: dict[str, str] | None = None) -> ProcessRecord:
        """Start ``argv`` in its own session, output appended to its log, and record its PID."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log(name)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True)
        _children[proc.pid] = proc
        return self.adopt(name, proc.pid, argv[0], log_path, labels)

    def exited_early(self, record: ProcessRecord) -> int | None:
        """The exit code of a process this Python process started, once it has exited."""
        child = _children.get(record.pid)
        return child.poll() if child is not None else None

    def stop(self, name: str, timeout_s: float = 30.0) -> bool:
        """SIGTERM the process group, wait for exit, SIGKILL after ``timeout_s``. True if it ran."""
        record = self.record(name)
        if record is None:
            return False
        terminate(record.pid, record.start_ticks, timeout_s)
        self.pidfile(name).unlink(missing_ok=True)
        return True

    def exited_tail(self, name: str, lines: int = 30) -> str | None:
        """The end of the log of ``name`` if this table started it and it is gone, else None (it runs, or
        it was never started here: Kubernetes, another machine)."""
        if not self.pidfile(name).exists() or self.record(name) is not None:
            return None
        return self.tail(name, lines)

    def tail(self, name: str, lines: int = 25) -> str:
        try:
            text = self.log(name).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def terminate(pid: int, start: int | None, timeout_s: float = 30.0) -> int | None:
    """Stop a process (and its process group, if it leads one) and wait until it is gone; its exit status
    when this Python process started it, else None."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 10)
        while time.monotonic() < deadline and pid_alive(pid, start):
            time.sleep(0.1)
        if not pid_alive(pid, start):
            break
    child = _children.pop(pid, None)
    if child is not None:
        return child.wait(timeout=10)
    return None


def on_stop_signals(stop: Callable[[], None], signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Call ``stop`` once, from a thread of its own, when one of ``signals`` arrives (main thread only).

    A Python signal handler runs in the main thread between two bytecodes, possibly while that thread
    holds a lock: inside ``Event.set`` or ``Event.wait`` (a ``Condition`` over a plain ``Lock``). A
    handler that sets an ``Event`` then waits on a lock its own thread holds, for ever. It happened: a
    DDP rank gets SIGTERM twice (its process group's, and its supervisor's forward), the second one
    arriving inside the first handler's ``Event.set``; the rank hung until SIGKILL 30 s later. So the
    handler only writes a byte to a pipe (no lock), and a thread that reads it calls ``stop``."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def handler(_signum: int, _frame: object) -> None:
        try:
            os.write(write_fd, b"s")
        except BlockingIOError:  # the pipe is full of earlier signals: the stop is under way
            pass

    def relay() -> None:
        if os.read(read_fd, 1):
            stop()

    threading.Thread(target=relay, name="essp-stop-signal", daemon=True).start()
    for sig in signals:
        signal.signal(sig, handler)
