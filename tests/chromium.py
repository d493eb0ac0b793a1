"""Headless Chromium for tests, driven over the DevTools protocol on a pipe (standard library only).

``chromium --headless --remote-debugging-pipe`` reads protocol commands from its fd 3 and
writes replies and events to its fd 4, one JSON message per NUL byte: no websocket client,
no port. A test opens a page, evaluates JavaScript in it (waiting for a condition) and takes
screenshots::

    with Chromium() as browser:
        page = browser.open("file:///tmp/report.html")
        page.wait_for("typeof app !== 'undefined'")
        png = page.screenshot()

Debian's package is ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Self

__all__ = ["Chromium", "ChromiumError", "Page", "find_chromium", "png_is_blank", "png_size"]


class ChromiumError(RuntimeError):
    """The browser answered with an error, died, or a wait timed out."""


def find_chromium() -> str | None:
    """The Chromium binary on PATH (``$CHROMIUM`` first), or None."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _above(fd: int, low: int) -> int:
    """``fd`` moved to a number >= ``low``."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return new


class Chromium:
    """One headless Chromium process, its own throw-away profile, talked to over fds 3 and 4."""

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 900, timeout: float = 60.0) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise ChromiumError("no chromium on PATH (Debian: apt-get install chromium)")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="finetail-chromium-")
        to_child_r, self._to_child = (_above(fd, 10) for fd in os.pipe())  # never 3 or 4 themselves
        self._from_child, from_child_w = (_above(fd, 10) for fd in os.pipe())
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}", "about:blank"]
        # The protocol's fds 3 (commands in) and 4 (replies out), set up by the bash that execs
        # chromium (no preexec_fn: this process may have threads).
        fds = f"3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-"
        self._log = open(os.path.join(self._profile, "chromium.log"), "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(["/bin/bash", "-c", f'exec "$0" "$@" {fds}', *args], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    # -- the protocol
    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one command and wait for its reply's ``result``."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise ChromiumError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError("no reply from chromium in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise ChromiumError(f"chromium exited (code {self.proc.poll()}); log:\n{self.log_tail()}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        with open(self._log.name) as f:
            return f.read()[-n:]

    def open(self, url: str) -> Page:
        """A new tab on ``url``."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Page.navigate", {"url": url})
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except (ChromiumError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: evaluate JavaScript, wait for a condition, take a screenshot."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (a promise is awaited); raises on an exception."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise ChromiumError(f"{expression[:200]!r} raised: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def child_frames(self) -> list[dict]:
        """The page's frames below the top one (iframes): ``{"id", "url", ...}`` each."""
        out, todo = [], list(self.send("Page.getFrameTree")["frameTree"].get("childFrames", []))
        while todo:
            node = todo.pop(0)
            out.append(node["frame"])
            todo.extend(node.get("childFrames", []))
        return out

    def evaluate_in_frame(self, frame_id: str, expression: str):
        """:meth:`evaluate` inside an iframe (an isolated world of it: its DOM, not its scripts)."""
        ctx = self.send("Page.createIsolatedWorld", {"frameId": frame_id, "worldName": "finetail-test"})
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True,
                                            "contextId": ctx["executionContextId"]})
        if "exceptionDetails" in r:
            raise ChromiumError(f"{expression[:200]!r} raised in frame {frame_id}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 30.0, interval: float = 0.2):
        """Evaluate ``condition`` until it is truthy; its value. Raises ChromiumError on timeout."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(condition)
            except ChromiumError as e:  # e.g. the page is still loading its scripts
                last = e
            else:
                if last:
                    return last
            time.sleep(interval)
        raise ChromiumError(f"timed out after {timeout:g} s waiting for {condition[:300]!r} (last: {last!r})")

    def console_errors(self) -> list[str]:
        """Exceptions the page threw and console errors it logged so far."""
        out = []
        for ev in self.browser.events:
            if ev.get("sessionId") != self.session:
                continue
            if ev.get("method") == "Runtime.exceptionThrown":
                d = ev["params"]["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif ev.get("method") == "Runtime.consoleAPICalled" and ev["params"].get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in ev["params"]["args"]))
        return out

    def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def png_is_blank(png: bytes) -> bool:
    """True when every pixel of the PNG has one colour (a page that rendered nothing)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    lo, hi = zip(*img.getextrema(), strict=True)
    return lo == hi
