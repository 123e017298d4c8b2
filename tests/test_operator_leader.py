"""Leader election between operator processes (operator/kubelora_operator/leader.py): the real
`python -m kubelora_operator` three times, against the emulated API server's Lease, with short
lease timings. Pure decisions (who may take a Lease, what is written) are tested as functions.

What the emulator cannot show: a network partition. A stopped process (SIGSTOP) stands in for a
leader cut off from the API server: its renewals stop, a candidate takes over after the lease
duration, and when it runs again it finds its lease gone, writes nothing and exits.
"""
import datetime
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kube.fixtures import kube, kube_server, kubectl, wait_for  # noqa: F401 - fixtures
from prometheus_server import free_port
from test_operator import CRD_FILE, apply, demo_output_bucket, manifest, phase

from kubelora_operator import leader
from kubelora_operator.leader import Timing

REPO = Path(__file__).resolve().parents[1]
LEASES = "coordination.k8s.io/v1/leases"
JOBS = "batch/v1/jobs"
T = Timing()
AT = datetime.datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=datetime.timezone.utc)


def lease(holder: str, renew: str = "2026-11-27T12:00:00.000000Z", transitions: int = 0, duration: int = 15) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "kl", "namespace": "ops", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "renewTime": renew, "leaseTransitions": transitions,
                     "leaseDurationSeconds": duration, "acquireTime": "2026-11-27T11:00:00.000000Z"}}


def test_who_may_take_the_lease():
    seen = leader.observe(None, lease("a"), now=100.0)
    assert leader.may_take(None, "b", seen, 100.0, T)                     # none yet
    assert leader.may_take(lease(""), "b", seen, 100.0, T)                # released
    assert leader.may_take(lease("b"), "b", seen, 100.0, T)               # ours (a restarted container)
    assert not leader.may_take(lease("a"), "b", seen, 114.9, T)           # a's record unchanged, not yet 15 s
    assert leader.may_take(lease("a"), "b", seen, 115.0, T)
    # a renewal restarts the wait: the time is the candidate's own clock, from when it saw the change
    renewed = leader.observe(seen, lease("a", renew="2026-11-27T12:00:02.000000Z"), now=114.0)
    assert renewed.since == 114.0 and not leader.may_take(lease("a"), "b", renewed, 128.0, T)
    assert leader.observe(seen, lease("a"), now=114.0) is seen            # unchanged: the first sight counts
    # the Lease's own duration wins over the candidate's default
    assert leader.may_take(lease("a", duration=5), "b", seen, 105.0, T)


def test_what_taking_renewing_and_releasing_write():
    import kubernetes_validate
    taken = leader.claimed(lease("a", transitions=3), "b", "ops", "kl", T, AT)
    assert taken["spec"]["holderIdentity"] == "b" and taken["spec"]["leaseTransitions"] == 4
    assert taken["spec"]["acquireTime"] == taken["spec"]["renewTime"] == "2026-11-27T12:00:00.123456Z"
    assert taken["metadata"]["resourceVersion"] == "7"  # a concurrent taker's write makes ours a 409
    renewed = leader.claimed(lease("b", transitions=4), "b", "ops", "kl", T, AT)
    assert renewed["spec"]["leaseTransitions"] == 4 and renewed["spec"]["acquireTime"] == "2026-11-27T11:00:00.000000Z"
    first = leader.claimed(None, "b", "ops", "kl", T, AT)
    assert first["spec"]["leaseTransitions"] == 0 and "resourceVersion" not in first["metadata"]
    gone = leader.released(renewed, AT)
    assert gone["spec"]["holderIdentity"] == "" and gone["spec"]["leaseDurationSeconds"] == 1
    for body in (taken, renewed, first, gone):
        kubernetes_validate.validate(body, "1.33.0", strict=True)


def test_timing_is_checked():
    assert Timing().problems() == []
    assert any("renew deadline" in p for p in Timing(lease=10, renew_deadline=10).problems())
    assert any("retry period" in p for p in Timing(retry=10).problems())
    assert any("whole number" in p for p in Timing(lease=15.5, renew_deadline=10).problems())
    assert any("two retry periods" in p for p in Timing(lease=11, renew_deadline=10, retry=2).problems())


class Scripted(leader.Elector):
    """An Elector whose attempts follow a script (no API server): each entry is (seconds it
    takes, what it returns); counts how many ran at once."""

    def __init__(self, script, timing):
        super().__init__("ops", "kl", "me", timing)
        self.script, self.running, self.most = list(script), 0, 0

    def try_take(self):
        import time
        delay, result = self.script.pop(0)
        started = time.monotonic()
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(delay)
        self.running -= 1
        if result is True:
            self._renewed(started)
        return result, "me" if result else "other"


def test_a_renewal_that_conflicts_or_lags_is_retried_until_the_deadline_never_doubled():
    """client-go retries a failed renewal until the renew deadline: a 409 on the leader's own
    renewal (None) is not a loss; an attempt slower than its timeout is awaited by the next one,
    never raced by a second (whose write it could turn into that 409); only another holder seen
    (False) or the deadline ends the leadership."""
    import asyncio
    import time
    timing = Timing(lease=10, renew_deadline=3, retry=0.2)
    el = Scripted([(0, None), (0.5, True), (0, True), (0, False)], timing)
    el.renewed = time.monotonic()
    why = asyncio.run(el.keep())
    assert why == "the lease is held by other" and el.most == 1 and not el.script
    el = Scripted([(0, None)] * 40, timing)
    el.renewed = time.monotonic()
    t0 = time.monotonic()
    assert asyncio.run(el.keep()) == "no renewal succeeded for 3 s" and time.monotonic() - t0 >= 2.9


def test_a_stale_leader_writes_nothing(monkeypatch):
    """The fence: every write of kube.py, and the handlers' kopf patches, first checks the last
    renewal's age on the monotonic clock."""
    from kubelora_operator import kube as k
    elector = leader.Elector("ops", "kl", "a", Timing(lease=3, renew_deadline=2, retry=1))
    monkeypatch.setattr(leader, "current", elector)
    with pytest.raises(leader.NotLeader, match="renewal is older than 2 s"):
        k.patch_status("default", "x", {"phase": "Failed"})  # never reaches the API client
    elector.renewed = leader.time.monotonic() - 1.5
    leader.fence()
    elector.renewed = leader.time.monotonic() - 2.5
    with pytest.raises(leader.NotLeader):
        k.set_job_suspend("default", "x", True)
    monkeypatch.setattr(leader, "current", None)  # no election: no fence
    leader.fence()


class Candidate:
    """`python -m kubelora_operator --lease default/kubelora` as its own process (`lease=False`:
    without one, the way the image's CMD starts it)."""

    def __init__(self, kube, identity: str, tmp: Path, lease: bool = True):
        self.identity, self.health, self.metrics = identity, free_port(), free_port()
        self.log = tmp / f"{identity}.log"
        env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO / "operator")]),
               "KUBELORA_OPERATOR_METRICS_PORT": str(self.metrics),
               "KUBELORA_LEASE_DURATION_SECONDS": "15", "KUBELORA_LEASE_RENEW_DEADLINE_SECONDS": "4",
               "KUBELORA_LEASE_RETRY_SECONDS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubelora_operator", *(["--lease", "default/kubelora"] if lease else []),
             "--identity", identity, f"--liveness=http://127.0.0.1:{self.health}/healthz"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)

    def get(self, port: int, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return ""

    def leading(self) -> str:
        """'1' or '0' as its kubelora_operator_leader gauge reads, '' before it serves."""
        for line in self.get(self.metrics, "/metrics").splitlines():
            if line.startswith("kubelora_operator_leader "):
                return line.split()[1][0]
        return ""

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def holder(kube) -> str:
    return ((kube.get(LEASES, "default", "kubelora") or {}).get("spec") or {}).get("holderIdentity", "-")


def test_one_operator_acts_standby_takes_over_and_a_frozen_leader_writes_nothing(kube, kubectl, s3, tmp_path):
    kubectl("apply", "-f", CRD_FILE, check=True)
    demo_output_bucket(s3)
    a = Candidate(kube, "op-a", tmp_path)
    procs = [a]
    try:
        wait_for(lambda: holder(kube) == "op-a", timeout=60)
        wait_for(lambda: a.leading() == "1", timeout=30)
        b, d = Candidate(kube, "op-b", tmp_path), Candidate(kube, "op-d", tmp_path)
        procs += [b, d]
        # b stands by: its liveness endpoint answers (the kubelet keeps it), it does not act
        wait_for(lambda: '"standby": true' in b.get(b.health, "/healthz"), timeout=60)
        wait_for(lambda: b.leading() == "0", timeout=30)
        # a standby stopped (scale-down, drain) exits at once and cleanly: it handles SIGTERM itself
        # (PID 1 in its container drops a signal it has no handler for), and holds nothing to release
        wait_for(lambda: '"standby": true' in d.get(d.health, "/healthz"), timeout=60)
        os.kill(d.proc.pid, signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0, d.output()
        assert "released" not in d.output() and holder(kube) == "op-a"
        assert apply(kubectl, manifest("one")).returncode == 0
        wait_for(lambda: kube.get(JOBS, "default", "one"), timeout=30)
        wait_for(lambda: "is held by op-a: standing by" in b.output(), timeout=30)

        # a graceful stop releases the lease: b takes it at its next try (1 s), well before the
        # 15 s a candidate waits on a lease left behind
        os.kill(a.proc.pid, signal.SIGTERM)
        assert a.proc.wait(timeout=60) == 0, a.output()
        assert "released" in a.output()
        wait_for(lambda: holder(kube) == "op-b", timeout=12)
        assert apply(kubectl, manifest("two")).returncode == 0
        wait_for(lambda: kube.get(JOBS, "default", "two"), timeout=30)
        assert b.leading() == "1"

        # b freezes (a partition's stand-in): c takes over once b's record is 15 s old
        os.kill(b.proc.pid, signal.SIGSTOP)
        c = Candidate(kube, "op-c", tmp_path)
        procs.append(c)
        wait_for(lambda: holder(kube) == "op-c", timeout=90)
        assert apply(kubectl, manifest("three")).returncode == 0
        wait_for(lambda: kube.get(JOBS, "default", "three"), timeout=30)

        # c freezes too, a new job arrives, b wakes: b finds the lease c's, writes nothing, exits 1
        os.kill(c.proc.pid, signal.SIGSTOP)
        assert apply(kubectl, manifest("four")).returncode == 0
        os.kill(b.proc.pid, signal.SIGCONT)
        assert b.proc.wait(timeout=60) == 1, b.output()
        # which it notices first depends on where its renewal loop was frozen: the new holder, or
        # its own deadline gone by
        assert re.search(r"lost leadership \((the lease is held by op-c|no renewal succeeded for 4 s)\)", b.output())
        assert kube.get(JOBS, "default", "four") is None and phase(kube, "four") is None
        # c wakes: nobody took its lease, it renews and acts
        os.kill(c.proc.pid, signal.SIGCONT)
        wait_for(lambda: kube.get(JOBS, "default", "four"), timeout=60)
        assert holder(kube) == "op-c" and c.proc.poll() is None, c.output()
        transitions = kube.get(LEASES, "default", "kubelora")["spec"]["leaseTransitions"]
        assert transitions == 2, transitions  # a -> b (after a release), b -> c
    finally:
        for p in procs:
            p.stop()
    assert kube.errors() == []


def test_the_entry_point_without_a_lease_acts_at_once(kube, kubectl, s3, tmp_path):
    """`python -m kubelora_operator` as the image's CMD runs it (all namespaces, no --lease): it
    acts without a Lease and stops cleanly on SIGTERM. (Its first version passed kopf
    namespaces=None and crashed at start; the tests drove kopf's own CLI runner.)"""
    kubectl("apply", "-f", CRD_FILE, check=True)
    demo_output_bucket(s3)
    op = Candidate(kube, "solo", tmp_path, lease=False)
    try:
        assert apply(kubectl, manifest("solo")).returncode == 0
        wait_for(lambda: kube.get(JOBS, "default", "solo"), timeout=60)
        assert op.leading() == "1" and kube.get(LEASES, "default", "kubelora") is None
        wait_for(lambda: op.get(op.health, "/healthz"), timeout=30)  # kopf's liveness endpoint
        os.kill(op.proc.pid, signal.SIGTERM)
        assert op.proc.wait(timeout=60) == 0, op.output()
    finally:
        op.stop()
    assert "Traceback" not in op.output(), op.output()


def test_bad_lease_settings_stop_the_operator_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO / "operator")]),
           "KUBELORA_LEASE_RENEW_DEADLINE_SECONDS": "20", "KUBELORA_OPERATOR_METRICS_PORT": "0"}
    for args, expect in ((["--lease", "kubelora"], "--lease 'kubelora': give it as NAMESPACE/NAME"),
                         (["--lease", "ops/kubelora"], "must be below the lease duration")):
        r = subprocess.run([sys.executable, "-m", "kubelora_operator", *args], env=env, capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 2 and expect in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_a_release_closes_the_fence_for_good_even_when_a_renewal_lands_after():
    """The release path closes the fence, waits for an attempt under way, then releases: that
    attempt's success must not open the fence again (the next leader takes the released lease at
    once, so this process writing on would make two writers)."""
    import asyncio
    import time
    el = Scripted([(0.3, True)], Timing(lease=10, renew_deadline=3, retry=0.2))
    el.renewed = time.monotonic()

    async def release_during_a_renewal():
        pending = asyncio.ensure_future(el._attempt(5))
        await asyncio.sleep(0.1)  # the renewal is under way in its thread
        el.stop_leading()
        await el.settle()
        await pending
    asyncio.run(release_during_a_renewal())
    assert el.renewed is None and not el.leading()
    with pytest.raises(leader.NotLeader):
        leader.current, saved = el, leader.current
        try:
            leader.fence()
        finally:
            leader.current = saved
