"""What the tests of the Airflow UI share (test-only): a real Airflow on PostgreSQL (`essp airflow up|down`:
the four processes on a database of their own, with isolated buckets and prefixes, started once per module
and stopped by PID from another process), a REST client with its token, and one headless Chromium signed in
through Airflow's real login page (tests/cdp.py). A test module takes them by importing the fixtures
``airflow_ui`` and ``browser`` (module-scoped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cdp import Browser
from conftest import airflow_test_settings, remove_airflow_test

from essp.settings import Settings
from essp.stack.airflow import PROCESSES, AirflowStack, api_healthy
from essp.stack.procs import pid_alive
from essp.stack.services import LocalStack

SHOT_SIZE = (1400, 1800)
BROWSER_SIZE = (1400, 1100)  # the module's browser (tests/cdp.py's default)
FORM_TIMEOUT_S = 30


@dataclass
class AirflowUI:
    """A running Airflow (api-server, scheduler, dag-processor, triggerer) with ESSP's isolated settings."""

    settings: Settings
    _token: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.settings.airflow_url

    def token(self) -> str:
        """A JWT for the REST API (fetched once)."""
        if self._token is None:
            body = {"username": self.settings.airflow_user, "password": self.settings.secret("airflow_password")}
            self._token = self.call("POST", "/auth/token", body, auth=False)["access_token"]
        return self._token

    def request(self, method: str, path: str, body: dict | None = None, *, auth: bool = True,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """status, headers, body of one request (an HTTP error status is returned, not raised)."""
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, method=method, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def call(self, method: str, path: str, body: dict | None = None, *, auth: bool = True) -> Any:
        """The JSON answer of a REST call; an error status fails the test with the answer."""
        status, _, raw = self.request(method, path, body, auth=auth)
        assert 200 <= status < 300, f"{method} {path} -> {status}: {raw[:2000]!r}"
        return json.loads(raw or b"{}")


@pytest.fixture(scope="module")
def airflow_ui(base_settings, tmp_path_factory) -> Iterator[AirflowUI]:
    settings = airflow_test_settings(base_settings, tmp_path_factory.mktemp("airflow-ui"), "t")
    LocalStack(settings).up(["postgres"])  # creates the database
    stack = AirflowStack(settings)
    try:
        # `essp airflow up` starts the four processes once; again, it finds them running
        assert stack.up() == {p: "started" for p in PROCESSES}
        pids = stack.status()
        assert stack.up() == {p: "already running" for p in PROCESSES} and stack.status() == pids
        yield AirflowUI(settings)
        # `essp airflow down` from another process (the processes rename themselves: the PID files
        # still find them) stops all four
        done = subprocess.run([str(Path(sys.executable).parent / "essp"), "airflow", "down"],
                              env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert all(process in done.stdout for process in PROCESSES)
        deadline = time.monotonic() + 30
        while any(pid_alive(pid) for pid in pids.values() if pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(pid_alive(pid) for pid in pids.values() if pid) and not api_healthy(settings)
    finally:
        stack.down()
        _stop_residents(settings)
        remove_airflow_test(settings)


def _stop_residents(settings: Settings) -> None:
    """The resident workers the DAG runs started under the stack's state folder (a run that failed, or a test
    that stopped half way, leaves its trainers and data workers running)."""
    from essp.stack.procs import ProcessTable

    table = ProcessTable(settings.state_dir)
    names = [p.stem for p in table.run_dir.glob("*.pid")] if table.run_dir.exists() else []
    for name in names:
        if not name.startswith("airflow-"):
            table.stop(name, timeout_s=20)


@pytest.fixture(scope="module")
def browser(airflow_ui, tmp_path_factory) -> Iterator[Browser]:
    """One headless Chromium for the module, logged in through Airflow's real login page."""
    ui = airflow_ui
    with Browser(shots_dir=tmp_path_factory.mktemp("browser"), timeout_s=FORM_TIMEOUT_S) as b:
        b.navigate(f"{ui.url}/")
        b.wait_for("location.pathname.startsWith('/auth/login')", what="the redirect to the login page")
        b.type("input[name=username]", ui.settings.airflow_user)
        b.type("input[name=password]", ui.settings.secret("airflow_password"))
        b.click("button[type=submit]", text="Sign in")
        b.wait_for("!location.pathname.startsWith('/auth') && document.querySelector('[data-testid=nav-dags-link]')",
                   what="the UI after signing in")
        yield b




def screenshot(b: Browser, url: str | None, path: Path, size: tuple[int, int] = SHOT_SIZE) -> Path:
    """``url`` (None: the page as it is) as the signed-in browser shows it, ``size`` large."""
    width, height = size
    b.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    try:
        if url is not None:
            b.navigate(url)
        return b.screenshot(path)
    finally:
        b.send("Emulation.setDeviceMetricsOverride", width=BROWSER_SIZE[0], height=BROWSER_SIZE[1],
               deviceScaleFactor=1, mobile=False)
