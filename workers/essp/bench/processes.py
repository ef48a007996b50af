"""Measuring processes from /proc: CPU seconds and bytes written to disk of PIDs (this process, the
workers, the local stack's services), and the machine the figures are taken on."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Processes of the local stack whose disk writes are reported beside the data plane's own.
SERVICE_PROCESSES = {"redis-server": "redis", "weed": "s3 (weed)", "tansu": "kafka (tansu)"}


def machine_info() -> dict[str, Any]:
    """CPU model and core count (from /proc/cpuinfo), usable cores, memory and load."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": mem_gib,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "python": sys.version.split()[0]}


def write_bytes(pid: int | str = "self") -> int | None:
    """Bytes the process caused to be written to storage (``write_bytes`` of /proc/<pid>/io: counted
    when a page is dirtied, so a file written and deleted before write-back still counts); None
    when unreadable (gone, or another user's process)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def service_pids() -> dict[str, list[int]]:
    """PIDs of the local stack's Redis, SeaweedFS and Tansu processes, by role."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        role = SERVICE_PROCESSES.get(comm)
        if role:
            found.setdefault(role, []).append(int(entry.name))
    return found


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU seconds of the process (all its threads) so far; None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ProcessMeter:
    """CPU seconds and ``write_bytes`` of processes, grouped by role, since the meter was made; a
    process started later counts from zero (as a new process does)."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles
        self.start = {pid: (cpu_seconds(pid), write_bytes(pid)) for pids in roles.values() for pid in pids}

    def deltas(self, roles: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
        """{role: {"cpu_s": ..., "write_bytes": ...}}; None where no process of the role was readable."""
        out: dict[str, dict[str, Any]] = {}
        for role, pids in (roles or self.roles).items():
            cpu: float | None = None
            disk: int | None = None
            for pid in pids:
                cpu0, disk0 = self.start.get(pid, (0.0, 0))
                now_cpu, now_disk = cpu_seconds(pid), write_bytes(pid)
                if now_cpu is not None:
                    cpu = (cpu or 0.0) + now_cpu - (cpu0 or 0.0)
                if now_disk is not None:
                    disk = (disk or 0) + now_disk - (disk0 or 0)
            out[role] = {"cpu_s": cpu, "write_bytes": disk}
        return out


class MemoryBroker:
    """A Tansu broker of the benchmark's own that keeps its log in memory (``--broker memory``): the
    plane measured without the local stack's broker, which writes every produce and commit as objects
    in SeaweedFS (~8 ms of CPU per partition written, ~5 per commit). Nothing it holds survives it; the
    stack's own broker is not touched. Use as a context manager: its port while it runs."""

    def __init__(self, log_path: Path, timeout_s: float = 20.0) -> None:
        self.log_path = log_path
        self.timeout_s = timeout_s
        self._process: Any = None

    def __enter__(self) -> int:
        import socket
        import subprocess
        import time

        from kafka.admin import KafkaAdminClient

        from essp.stack.services import InfraError, tansu_binary

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"tcp://127.0.0.1:{port}"
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [tansu_binary(), "broker", "--cluster-id", "essp-bench", "--listener-url", url,
                 "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._process.poll() is not None:
                raise InfraError(f"the benchmark's in-memory Tansu broker exited with {self._process.returncode}; "
                                 f"its log: {self.log_path}")
            try:
                KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000).close()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise InfraError(f"the benchmark's in-memory Tansu broker did not answer on port {port} within "
                                     f"{self.timeout_s:.0f}s; its log: {self.log_path}") from None
                time.sleep(0.2)
        return port

    def __exit__(self, *_exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except Exception:  # noqa: BLE001 - it would not stop: kill it
                self._process.kill()
                self._process.wait(10)
