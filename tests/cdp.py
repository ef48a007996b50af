"""A small synchronous Chrome DevTools Protocol client for browser tests (test-only).

:class:`Browser` launches headless Chromium in its own session (its own process group, killed on
close) with a fresh profile and remote debugging on a free port, attaches to its page over a
websocket (``websocket-client``) and drives it as a user would: navigate, wait for a selector or a
condition, click with real mouse events, type with real key and text input, read the page's text,
take screenshots. A wait that times out raises :class:`BrowserTimeout` with what it waited for, the
page's URL and visible text, and the path of a screenshot taken at that moment.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from essp.stack.browser import ensure_chromium

TEXT_TAIL = 4000


class BrowserError(AssertionError):
    """Chromium failed, or a page did not do what the test expected."""


class BrowserTimeout(BrowserError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _find(selector: str, text: str | None) -> str:
    """A JS expression: the first visible element matching ``selector`` whose text is ``text`` (else the first
    whose text contains it), or null."""
    return (f"(() => {{ const t = {json.dumps(text)}, s = e => (e.innerText || e.value || '').trim();"
            f" const all = [...document.querySelectorAll({json.dumps(selector)})]"
            ".filter(e => e.getClientRects().length); return (t === null ? all[0]"
            " : all.find(e => s(e) === t) || all.find(e => s(e).includes(t))) || null; })()")


class Browser:
    """Headless Chromium driven over CDP; use as a context manager (the browser is killed on exit)."""

    def __init__(self, *, width: int = 1400, height: int = 1100, timeout_s: float = 30,
                 shots_dir: Path | None = None) -> None:
        self.timeout_s = timeout_s
        self._scratch = tempfile.TemporaryDirectory(prefix="essp-cdp-")
        # screenshots outlive the browser (a failure message names them); the profile does not
        self.shots_dir = Path(shots_dir or tempfile.mkdtemp(prefix="essp-cdp-shots-"))
        self._ids = itertools.count(1)
        self._shots = itertools.count(1)
        port = _free_port()
        self._log = open(Path(self._scratch.name) / "chromium.log", "wb")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [ensure_chromium(), "--headless=new", f"--remote-debugging-port={port}",
             f"--user-data-dir={Path(self._scratch.name) / 'profile'}", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-default-apps", "--mute-audio", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.ws = websocket.create_connection(self._page_ws(port), timeout=60, suppress_origin=True)
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def _page_ws(self, port: int) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as response:
                    pages = [t for t in json.loads(response.read()) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (Path(self._scratch.name) / "chromium.log").read_text(errors="replace")[-TEXT_TAIL:]
                raise BrowserError(f"chromium gave no DevTools page on port {port} (exit {self.process.poll()}):"
                                   f"\n{log}")
            time.sleep(0.1)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the browser's whole process group (renderers, GPU and zygote processes too)."""
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=30)
        self._log.close()
        self._scratch.cleanup()

    # --- protocol ---------------------------------------------------------------------------------------
    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command's result (events arriving meanwhile are dropped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == msg_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JS expression (promises awaited); a JS exception raises :class:`BrowserError`."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"JS error in {expression[:200]!r}: "
                               f"{details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    # --- what the page shows --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.evaluate("location.href")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path | None = None) -> Path:
        path = Path(path or self.shots_dir / f"shot-{next(self._shots)}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def fail(self, what: str) -> BrowserError:
        shot = self.screenshot()
        return BrowserError(f"{what}\nURL: {self.url}\nscreenshot: {shot}\npage text:\n{self.text()[-TEXT_TAIL:]}")

    # --- waiting ------------------------------------------------------------------------------------------
    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", what=f"{url} to load")

    def wait_for(self, condition: str, *, what: str | None = None, timeout_s: float | None = None) -> Any:
        """The first truthy value of a JS expression (an element counts as true), polled; a timeout raises
        with the page's state."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            try:
                # an element counts as true, one of an iframe too (another realm's Node)
                value = self.evaluate(f"(v => v instanceof Node || (v && typeof v.nodeType === 'number') ? true : v)"
                                      f"({condition})")
            except BrowserError:  # e.g. the context went away during a navigation
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                shot = self.screenshot()
                raise BrowserTimeout(f"timed out after {timeout_s or self.timeout_s:.0f}s waiting for "
                                     f"{what or condition}\nURL: {self.url}\nscreenshot: {shot}\n"
                                     f"page text:\n{self.text()[-TEXT_TAIL:]}")
            time.sleep(0.1)

    def wait_selector(self, selector: str, *, text: str | None = None, timeout_s: float | None = None) -> None:
        what = f"{selector!r}" + (f" containing {text!r}" if text else "")
        self.wait_for(f"{_find(selector, text)} !== null", what=what, timeout_s=timeout_s)

    def wait_text(self, text: str, *, timeout_s: float | None = None) -> None:
        self.wait_for(f"document.body && document.body.innerText.includes({json.dumps(text)})",
                      what=f"the text {text!r}", timeout_s=timeout_s)

    # --- the page's iframe (the Airflow UI shows plugin pages in one) ---------------------------------------
    def frame_evaluate(self, expression: str) -> Any:
        """``expression`` with ``doc``: the document of the page's first iframe (same origin), or null."""
        return self.evaluate(f"(doc => ({expression}))((document.querySelector('iframe') || {{}}).contentDocument "
                             "|| null)")

    def frame_text(self) -> str:
        return self.frame_evaluate("doc && doc.body ? doc.body.innerText : ''") or ""

    def wait_frame(self, condition: str, *, what: str, timeout_s: float | None = None) -> Any:
        """The first truthy value of ``condition`` (with ``doc``, the iframe's document) in the page's iframe."""
        return self.wait_for(f"(doc => doc && doc.body && doc.readyState === 'complete' && ({condition}))"
                             "((document.querySelector('iframe') || {}).contentDocument || null)",
                             what=f"{what} in the page's iframe", timeout_s=timeout_s)

    def wait_frame_text(self, text: str, *, timeout_s: float | None = None) -> None:
        self.wait_frame(f"doc.body.innerText.includes({json.dumps(text)})", what=f"the text {text!r}",
                        timeout_s=timeout_s)

    def click_in_frame(self, selector: str, *, text: str | None = None) -> None:
        """A real mouse click at the centre of an element of the page's iframe."""
        find = _find(selector, text).replace("document.querySelectorAll", "doc.querySelectorAll")
        self.wait_frame(f"{find} !== null", what=f"{selector!r}" + (f" containing {text!r}" if text else ""))
        x, y = self.frame_evaluate(f"(() => {{ const e = {find}; e.scrollIntoView({{block: 'center'}}); const f = "
                                   "document.querySelector('iframe').getBoundingClientRect(), r = "
                                   "e.getBoundingClientRect(); return [f.x + r.x + r.width / 2, f.y + r.y + "
                                   "r.height / 2]; })()")
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    # --- input --------------------------------------------------------------------------------------------
    def click(self, selector: str, *, text: str | None = None, timeout_s: float | None = None) -> None:
        """A real mouse click at the centre of the element (waited for first)."""
        self.wait_selector(selector, text=text, timeout_s=timeout_s)
        x, y = self.evaluate(f"(() => {{ const e = {_find(selector, text)}; e.scrollIntoView({{block: 'center'}});"
                             " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];"
                             " })()")
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def hover(self, selector: str, *, text: str | None = None) -> None:
        """Move the mouse over the element's centre (a tooltip shows)."""
        self.wait_selector(selector, text=text)
        x, y = self.evaluate(f"(() => {{ const e = {_find(selector, text)}; e.scrollIntoView({{block: 'center'}});"
                             " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];"
                             " })()")
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def key(self, key: str, *, code: str | None = None, keycode: int = 0, commands: list[str] | None = None,
            modifiers: int = 0) -> None:
        """Press and release one key (``Tab``, ``Enter``, ...); ``commands`` e.g. ["selectAll"]; ``modifiers``:
        CDP's bit field (2: Ctrl), for editors that read the key itself (Monaco's Ctrl+A)."""
        params: dict[str, Any] = {"key": key, "code": code or key, "windowsVirtualKeyCode": keycode,
                                  "modifiers": modifiers}
        self.send("Input.dispatchKeyEvent", type="rawKeyDown", **params, **({"commands": commands} if commands else {}))
        self.send("Input.dispatchKeyEvent", type="keyUp", **params)

    def type(self, selector: str, text: str, *, clear: bool = True) -> None:
        """Click into the input, select what it holds (to be replaced) and type ``text`` as real text input."""
        self.click(selector)
        if clear:
            self.key("a", code="KeyA", keycode=65, commands=["selectAll"])
            self.key("Backspace", keycode=8)
        if text:
            self.send("Input.insertText", text=text)

    def set_value(self, selector: str, value: str) -> None:
        """Set a React-controlled input through the native value setter plus an input event."""
        self.wait_selector(selector)
        self.evaluate(f"(() => {{ const e = {_find(selector, None)}; const proto = Object.getPrototypeOf(e);"
                      " Object.getOwnPropertyDescriptor(proto, 'value').set.call(e, " + json.dumps(value) + ");"
                      " e.dispatchEvent(new Event('input', {bubbles: true})); })()")
