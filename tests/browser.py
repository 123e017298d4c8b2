"""A real headless browser for the tests: the system's chromium, driven over the Chrome DevTools
protocol (websocket-client). No browser download; a missing chromium fails loudly with the fix."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

INSTALL_HINT = ("chromium is not installed: the report tests render report.html in a real browser. Install it with "
                "`apt-get install -y chromium` (Debian/Ubuntu; `make test` does this when run as root)")


def chromium_binary() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.fail(INSTALL_HINT)
    return path


class Page:
    """One tab: commands answered in order, events kept (console errors, exceptions, failed loads)."""

    def __init__(self, ws_url: str):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id, self.session, self.events = 0, None, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _read(self) -> dict:
        msg = json.loads(self.ws.recv())
        if "method" in msg:
            self.events.append(msg)
        return msg

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def wait_for(self, method: str, deadline_s: float = 60, since: int | None = None) -> dict:
        """The first `method` event from events[since] on (default: from now), reading as needed."""
        end = time.monotonic() + deadline_s
        seen = len(self.events) if since is None else since
        while time.monotonic() < end:
            for e in self.events[seen:]:
                if e["method"] == method:
                    return e
            seen = len(self.events)
            self._read()
        raise TimeoutError(f"no {method} within {deadline_s} s")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")


class Browser:
    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="kubelora-chromium-")
        self.proc = subprocess.Popen(
            [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in self.proc.stderr:  # chromium prints its endpoint once it listens
            lines.append(line)
            if "DevTools listening on " in line:
                self.ws_url = line.split("DevTools listening on ", 1)[1].strip()
                return self
        raise RuntimeError("chromium exited before listening:\n" + "".join(lines[-20:]))

    def open(self, path: Path) -> Page:
        page = Page(self.ws_url)
        mark = len(page.events)  # the load event may arrive before navigate's own reply
        page.call("Page.navigate", url=Path(path).resolve().as_uri())
        page.wait_for("Page.loadEventFired", since=mark)
        return page

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


PAGE_FACTS = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const loss = document.querySelector('#loss-curve polyline');
  return {images: imgs.map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight})),
          lossPoints: loss ? loss.getAttribute('points').trim().split(/\\s+/).length : 0,
          lossBox: loss ? loss.getBoundingClientRect().width : 0,
          title: document.title};
})()"""


def render_report(path: Path, screenshot: Path) -> dict:
    """Open report.html; the page's facts, its errors, and a screenshot written to `screenshot`."""
    with Browser() as b:
        page = b.open(path)
        facts = page.evaluate(PAGE_FACTS)
        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        facts["errors"] = page.errors()
        page.ws.close()
    return facts
