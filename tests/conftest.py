"""Fixtures on the real local services. Each test gets its own topic prefix, Redis key prefix and
buckets, so tests never see each other's data; what a test creates is removed afterwards."""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from essp.settings import Settings
from essp.stack.services import LocalStack, isolated_settings, prepare_settings, remove_isolated


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings of the shared local stack, started (or reused) once per test session."""
    settings = prepare_settings()
    LocalStack(settings).up()
    return settings


@pytest.fixture
def settings(base_settings: Settings) -> Iterator[Settings]:
    """Settings isolated for one test: own topic prefix, Redis key prefix and buckets."""
    isolated = isolated_settings(base_settings, "t" + uuid.uuid4().hex[:10])
    yield isolated
    _cleanup(isolated)


def _cleanup(settings: Settings) -> None:
    remove_isolated(settings)


def airflow_test_settings(base_settings: Settings, state: Path, letter: str, **overrides: Any) -> Settings:
    """Settings for a test's own Airflow: ``state`` as its state folder (with the stack's secrets), free
    ports, its own PostgreSQL database, and its own prefixes and buckets (tagged ``letter`` + random hex)."""
    from essp.settings import SECRETS_FILE

    shutil.copy(base_settings.state_dir / SECRETS_FILE, state / SECRETS_FILE)
    tag = letter + uuid.uuid4().hex[:10]
    return Settings(state_dir=state, airflow_port=free_port_block(1), pg_database=f"essp_test_{tag}",
                    topic_prefix=tag, redis_prefix=tag, bucket_videos=f"{tag}-videos",
                    bucket_models=f"{tag}-models", bucket_runs=f"{tag}-runs", **overrides)


def remove_airflow_test(settings: Settings) -> None:
    """Drops the database of :func:`airflow_test_settings` and removes its topics, keys and buckets."""
    import psycopg2

    from essp.stack.services import pg_params

    conn = psycopg2.connect(**pg_params(settings, "postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{settings.pg_database}" WITH (FORCE)')
    conn.close()
    _cleanup(settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(count: int = 4, low: int = 20000, high: int = 32000) -> int:
    """The first of ``count`` consecutive ports that are all free now, below the kernel's ephemeral
    range (32768+ here), where outgoing connections would otherwise take them at random."""
    import random

    for _ in range(200):
        base = random.randrange(low, high - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports in {low}-{high}")


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound and released; nothing of ours will take it meanwhile)."""
    return free_port()


def _leftover_workers() -> list[tuple[int, str]]:
    """ESSP resident processes (workers, trainers) this test session started that still run."""
    import os
    from pathlib import Path

    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and "essp.cli worker" in cmdline:
            found.append((int(entry.name), cmdline.strip()))
    return found


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    """Hygiene (issue 11): the suite leaves no worker behind. One still running here is a test that did
    not stop what it started: it is killed, named, and the session fails."""
    import os
    import signal

    leftovers = _leftover_workers()
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftovers:
        lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in leftovers)
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"HYGIENE: {len(leftovers)} ESSP process(es) started by the suite still ran at its end (killed):\n{lines}",
            red=True)
        session.exitstatus = 1
