"""A small Chrome DevTools Protocol client: Debian's headless Chromium driven over a websocket.

Chromium is started on loopback only (``--remote-debugging-address=127.0.0.1``, port chosen by
Chromium and read back from ``DevToolsActivePort``), with a fresh profile and the flags that keep
it from calling home (background networking, component updates, sync, QUIC). One page target is
driven: navigate, evaluate JavaScript, wait for DOM conditions, click, screenshot. Console messages
and uncaught exceptions are collected so that a test can show them when it fails.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from tests.tools import require_binary

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI containers run as root, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process and one page, driven over CDP."""

    def __init__(self, width: int = 1600, height: int = 1000,
                 extra_flags: tuple[str, ...] = ()) -> None:
        self.width, self.height = width, height
        self.extra_flags = extra_flags
        self.proc: subprocess.Popen | None = None
        self.profile = Path(tempfile.mkdtemp(prefix="cdp-profile-"))
        self.console: list[str] = []
        self._ws: websocket.WebSocket | None = None
        self._next_id = 0
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []

    # -- process -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> Browser:
        exe = require_binary("chromium")
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, *self.extra_flags, f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=dict(os.environ, HOME=str(self.profile)))
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise CDPError(f"chromium exited with {self.proc.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                raise CDPError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as rsp:
            targets = json.loads(rsp.read())
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60,
                                               suppress_origin=True)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
            self.proc = None
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- protocol ------------------------------------------------------------------------
    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; events that arrive meanwhile are kept."""
        if self._ws is None:
            raise CDPError("browser not started")
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
            self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            deadline = time.monotonic() + timeout
            while True:
                self._ws.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    msg = json.loads(self._ws.recv())
                except websocket.WebSocketTimeoutException:
                    raise CDPError(f"{method}: no answer within {timeout} s") from None
                if msg.get("id") == msg_id:
                    if "error" in msg:
                        raise CDPError(f"{method}: {msg['error']}")
                    return msg.get("result", {})
                self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        method = msg.get("method", "")
        params = msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in
                            params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text[:500]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"exception: {str(exc)[:500]}")
        self._events.append(msg)
        del self._events[:-200]

    # -- page helpers --------------------------------------------------------------------
    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"evaluate failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str,
                 interval: float = 0.5) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(CDPError):
                last = self.evaluate(expression)
                if last:
                    return last
            time.sleep(interval)
        tail = "\n".join(self.console[-40:])
        raise CDPError(f"timed out after {timeout} s waiting for {what} (last value "
                       f"{last!r}); browser console:\n{tail}")

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def click_selector(self, selector: str) -> None:
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not box:
            raise CDPError(f"no element {selector!r} to click")
        self.click(*box)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
