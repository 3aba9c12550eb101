"""A real headless Chromium driven over the DevTools protocol through a pipe
(`--remote-debugging-pipe`: JSON messages ending in NUL on fds 3 and 4), so no WebDriver, no
websocket library and no browser download: Debian's `chromium` package is all it needs.

    with Chromium(binary, tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto("http://127.0.0.1:5000/#/experiments/1")
        text = page.wait_for_text(["Seq1", "Seq2"])     # the page's innerText once all are shown
        page.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Sequence

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--no-default-browser-check",
         "--disable-dev-shm-usage", "--window-size=1440,1000", "--remote-debugging-pipe")


class Chromium:
    def __init__(self, binary: str, profile: Path, timeout: float = 60.0):
        self.binary, self.profile, self.timeout = binary, Path(profile), timeout
        self._id = 0
        self._buf = b""
        self.proc: subprocess.Popen | None = None
        self.log = self.profile.with_suffix(".log")

    def __enter__(self) -> Chromium:
        self.profile.mkdir(parents=True, exist_ok=True)
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: the protocol's fds 3 (commands in) and 4 (replies out)
            # Lift both ends above 9 first: either may itself be fd 3 or 4, and dup2 onto itself
            # would keep its close-on-exec flag.
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=fds, close_fds=False, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it may be gone already; the kill below still runs
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        os.close(self._w)
        os.close(self._r)

    # -------------------------------------------------------------------------- protocol

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from Chromium; its log:\n{self._log_tail()}")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe; its log:\n{self._log_tail()}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def new_page(self) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, session=self.session)

    def goto(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {result['errorText']}")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: Sequence[str], timeout: float = 60.0) -> str:
        """The page's visible text once every needle is in it (a single-page app renders late)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"after {timeout:.0f} s the page lacks {missing}; it shows:\n"
                                     f"{text[:3000]}")
            time.sleep(0.5)

    def wait_until(self, expression: str, what: str, timeout: float = 60.0):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout:.0f} s still no {what}; the page shows:\n"
                                     f"{self.text()[:3000]}")
            time.sleep(0.5)

    def click(self, selector: str, timeout: float = 60.0) -> None:
        """Click the first element matching a CSS selector, once there is one."""
        js = (f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
              "if (!e) return false; e.click(); return true; })()")
        self.wait_until(js, f"element {selector}", timeout)

    def click_text(self, label: str, timeout: float = 60.0) -> None:
        """Click the first button or link whose visible text is `label`."""
        js = ("(() => { const e = Array.from(document.querySelectorAll('button, a, [role=button]'))"
              f".find(e => e.innerText.trim() === {json.dumps(label)}); "
              "if (!e) return false; e.click(); return true; })()")
        self.wait_until(js, f"button {label!r}", timeout)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
