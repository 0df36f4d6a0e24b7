"""A real headless browser for tests that look at a page as a person would (report.html).

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fd 3 carries
commands in, fd 4 replies and events out, each a JSON message ended by a NUL byte), so no driver
package is needed: what Playwright and Puppeteer do underneath. `make test-browser` installs Debian's
``chromium``; ``FEATPIPE_CHROMIUM`` names another Chromium-family binary.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    named = os.environ.get("FEATPIPE_CHROMIUM")
    if named:
        return named
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(
        "No Chromium found for the browser tests: run `make test-browser` (it installs Debian's chromium) "
        "or set FEATPIPE_CHROMIUM to a Chromium or Chrome binary."
    )


@dataclass
class Visit:
    """What a page did and showed once loaded."""

    requests: list[str] = field(default_factory=list)  # every URL the page asked for, the page itself first
    screenshot: bytes = b""  # PNG of the viewport
    values: dict = field(default_factory=dict)  # name -> result of each script passed to visit()


class Browser:
    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="featpipe-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def wire():  # in the child: its fd 3 reads our commands, its fd 4 writes to us
            # via fresh copies: a pipe end may already be fd 3 or 4, and dup2 onto itself keeps close-on-exec
            src_in, src_out = os.dup(cmd_r), os.dup(out_w)
            os.dup2(src_in, 3)
            os.dup2(src_out, 4)

        self._proc = subprocess.Popen(
            [
                find_chromium(),
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--hide-scrollbars",
                f"--user-data-dir={self._profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            close_fds=False,  # our own fds are close-on-exec; only the dup2'd 3 and 4 are inherited
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._next_id = 0
        self._events: list[dict] = []

    # ------------------------------------------------------------------ protocol

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (status {self._proc.poll()})")
                self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    # ------------------------------------------------------------------ what tests call

    def visit(self, url: str, width: int = 1280, height: int = 900, mobile: bool = False, scripts=None) -> Visit:
        """Open url in a fresh tab of the given size, wait for it to load, run scripts, screenshot it.

        scripts: {name: JavaScript expression}; a promise is awaited; the value comes back as JSON.
        """
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Page", "Network", "Runtime"):
                self.send(f"{domain}.enable", session=session)
            self.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
                session=session,
            )
            self._events = [e for e in self._events if e.get("sessionId") != session]
            self.send("Page.navigate", {"url": url}, session=session)
            self.wait_for("Page.loadEventFired", session)
            visit = Visit()
            for name, expression in (scripts or {}).items():
                result = self.send(
                    "Runtime.evaluate",
                    {"expression": expression, "awaitPromise": True, "returnByValue": True},
                    session=session,
                )
                if "exceptionDetails" in result:
                    raise RuntimeError(f"script {name!r} failed: {result['exceptionDetails']}")
                visit.values[name] = result["result"].get("value")
            shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)
            visit.screenshot = base64.b64decode(shot["data"])
            visit.requests = [
                e["params"]["request"]["url"]
                for e in self._events
                if e.get("sessionId") == session and e.get("method") == "Network.requestWillBeSent"
            ]
            return visit
        finally:
            self.send("Target.closeTarget", {"targetId": target})
            self._events = [e for e in self._events if e.get("sessionId") != session]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._cmd_w, self._out_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()
