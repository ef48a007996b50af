"""Fixtures on the real local services. Each test gets its own topic prefix, Redis key prefix and
buckets, so tests never see each other's data; what a test creates is removed afterwards."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

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
