"""Start and stop real worker processes (`essp worker ...`) for tests, with their own settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from essp.settings import Settings


class WorkerProcess:
    def __init__(self, settings: Settings, args: list[str], log_dir: Path, name: str) -> None:
        env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
        self.log_path = log_dir / f"{name}.log"
        self.name = name
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "essp.cli", "worker", *args, "--worker-id", name],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"serving" in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"worker {self.name} did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"worker {self.name} ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode


def start_workers(settings: Settings, log_dir: Path, specs: list[tuple[str, list[str]]]) -> list[WorkerProcess]:
    workers = [WorkerProcess(settings, args, log_dir, name) for name, args in specs]
    for worker in workers:
        worker.wait_serving()
    return workers
