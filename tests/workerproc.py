"""Worker processes for tests: the library's local workers (kept as a module for older imports)."""

from essp.deploy.local import LocalWorker as WorkerProcess
from essp.deploy.local import start_workers

__all__ = ["WorkerProcess", "start_workers"]
