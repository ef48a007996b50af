"""Resident workers as local processes: what `essp demo`, `essp bench` and the tests start, and
what the Airflow "ensure workers" step scales in the embedded default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from essp.errors import EsspError
from essp.settings import Settings


class LocalWorker:
    """One `essp worker ...` process with the given settings, its output in ``log_dir/<name>.log``."""

    def __init__(self, settings: Settings, args: list[str], log_dir: Path, name: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        # No .pyc writes: bytes on disk that have nothing to do with the data plane (the bench counts them).
        env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "essp.cli", "worker", *args, "--worker-id", name],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"serving" in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                raise EsspError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise EsspError(f"worker {self.name} did not start within {timeout:.0f}s:\n{self.log()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for a clean exit (SIGKILL and an error if it does not come)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise EsspError(f"worker {self.name} ignored SIGTERM for {timeout:.0f}s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode


def start_workers(settings: Settings, log_dir: Path, specs: list[tuple[str, list[str]]]) -> list[LocalWorker]:
    """Start every (name, args) worker, then wait until each serves; on failure stop them all."""
    workers = [LocalWorker(settings, args, log_dir, name) for name, args in specs]
    try:
        for worker in workers:
            worker.wait_serving()
    except BaseException:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.kill()
        raise
    return workers


def isolated_settings(settings: Settings, tag: str) -> Settings:
    """The same services under their own topic prefix, Redis key prefix and buckets (tests, bench)."""
    return settings.model_copy(update={
        "topic_prefix": tag, "redis_prefix": tag, "bucket_videos": f"{tag}-videos",
        "bucket_models": f"{tag}-models", "bucket_runs": f"{tag}-runs",
    })


def remove_isolated(settings: Settings) -> None:
    """Delete every Redis key, bucket and topic under the settings' own prefixes."""
    from essp.clients.kafka import delete_topics, kafka_admin
    from essp.clients.redis import redis_client
    from essp.clients.s3 import ObjectStore

    client = redis_client(settings)
    keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    store = ObjectStore(settings)
    for bucket in (settings.bucket_videos, settings.bucket_models, settings.bucket_runs):
        try:
            store.delete_bucket(bucket)
        except EsspError:
            pass
    admin = kafka_admin(settings)
    try:
        topics = [t for t in admin.list_topics() if t.startswith(settings.topic_prefix + ".")]
    finally:
        admin.close()
    if topics:
        delete_topics(settings, topics)
