"""Headless Chromium for screenshots of ESSP's web pages (the UI plugin's report, for docs and tests).

Chromium is Debian's package ``chromium``, installed on first use when missing (as root, like the
local stack's other packages). Every run gets a fresh profile and has Chromium's own background
traffic (updates, sync, field trials, QUIC) turned off: the machines this runs on may have no
outside network, and the page under test is all it needs to reach.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from essp.errors import EsspError
from essp.stack.services import apt_install

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
STDERR_TAIL_LINES = 30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BrowserError(EsspError):
    """Chromium is missing or failed to render a page."""


def find_chromium() -> str | None:
    """The Chromium binary, or None."""
    for path in CHROMIUM_PATHS:
        if Path(path).is_file():
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def ensure_chromium() -> str:
    """The path of the Chromium binary, installing Debian's ``chromium`` first when it is missing."""
    found = find_chromium()
    if found:
        return found
    apt_install(["chromium"], why="screenshots of ESSP pages need a headless Chromium")
    found = find_chromium()
    if not found:
        raise BrowserError("the Debian package chromium was installed but no chromium binary is on PATH")
    return found


def chromium_argv(binary: str, url: str, out_png: Path, profile: Path, *, width: int, height: int) -> list[str]:
    """The command line of one headless screenshot."""
    return [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
        f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={out_png}", url,
    ]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-STDERR_TAIL_LINES:]) or "(no output)"


def screenshot(url: str, out_png: Path, *, width: int = 1400, height: int = 1800, timeout_s: float = 90) -> Path:
    """Render ``url`` in headless Chromium at ``width`` x ``height`` and write it to ``out_png``."""
    binary = ensure_chromium()
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="essp-chromium-") as scratch:
        shot = Path(scratch) / "shot.png"  # written here first: a failed run leaves the old file alone
        profile = Path(scratch) / "profile"
        argv = chromium_argv(binary, url, shot, profile, width=width, height=height)
        # Its own session, so that a hung run is killed with its renderer and GPU helper processes.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=scratch, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            stdout, stderr = proc.communicate()
            raise BrowserError(f"chromium did not finish a screenshot of {url} within {timeout_s:.0f} s:\n"
                               f"{_tail(stderr)}") from None
        finally:
            _kill_group(proc.pid)  # helpers a finished browser left behind
        done = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        if done.returncode != 0:
            raise BrowserError(f"chromium exited {done.returncode} on {url}:\n{_tail(done.stderr)}")
        if not shot.is_file() or not shot.read_bytes()[:8] == PNG_SIGNATURE:
            raise BrowserError(f"chromium wrote no PNG for {url}:\n{_tail(done.stderr + done.stdout)}")
        shutil.move(str(shot), out_png)
    return out_png
