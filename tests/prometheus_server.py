"""A real Prometheus (Debian's `prometheus` package) for the tests: started on 127.0.0.1 on a free
port with a temporary storage folder and static scrape targets, queried over its HTTP API."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

INSTALL_HINT = ("Prometheus is not installed: the monitoring tests run the real one. Install Debian's package "
                "(`sudo apt-get install prometheus`, which gives /usr/bin/prometheus and promtool; `make test` does "
                "it when run as root)")


def binary(name: str) -> str:
    """The path of prometheus or promtool; fails the test loudly when missing (never skips)."""
    path = shutil.which(name)
    if not path:
        raise AssertionError(f"{name} not found. {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, interval: float = 0.2):
    """Poll check() until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
            last = got
        except Exception as e:  # noqa: BLE001 - keep polling; say the last error if it never works
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Prometheus:
    def __init__(self, folder: Path, targets: dict[str, list[str]], scrape_interval: str = "1s"):
        self.folder, self.targets, self.scrape_interval = folder, targets, scrape_interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 60) -> "Prometheus":
        config = {"global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                             "scrape_timeout": self.scrape_interval},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]}
                                     for job, t in self.targets.items()]}
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = open(self.folder / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.logs()}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        try:
            wait_for("Prometheus /-/ready", ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def logs(self) -> str:
        return (self.folder / "prometheus.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.proc = None

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar, as one sample) of expr now."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)
