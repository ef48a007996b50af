"""Failpoints: faults a test injects into a real process through its environment (as FoundationDB's
and TiKV's fail points do), never set in production.

``ESSP_FAILPOINTS`` holds ``site.action=match`` items, comma-separated; :func:`failpoint` at a site does
the action when its subject (e.g. the video's URI) contains ``match``. Actions: ``crash`` (SIGSEGV, as a
decoder's memory error ends a process), ``hang`` (never returns, as a decoder stuck in a loop) and
``error`` (raises RuntimeError). Sites: ``decode`` (before a sample's frames are decoded).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "ESSP_FAILPOINTS"


def _points() -> list[tuple[str, str, str]]:
    points = []
    for item in os.environ.get(ENV, "").split(","):
        if "=" not in item or "." not in item.split("=", 1)[0]:
            continue
        where, match = item.split("=", 1)
        site, action = where.strip().split(".", 1)
        points.append((site, action, match.strip()))
    return points


def failpoint(site: str, subject: str) -> None:
    """Do what ``ESSP_FAILPOINTS`` says for this site and subject (nothing when it is unset)."""
    if ENV not in os.environ:
        return
    for at, action, match in _points():
        if at != site or match not in subject:
            continue
        if action == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif action == "hang":
            while True:
                time.sleep(3600)
        elif action == "error":
            raise RuntimeError(f"failpoint {site}.{action} on {subject}")
