"""The operator's liveness (kopf's --liveness endpoint, the chart's livenessProbe): it answers 200
while the status syncs move, and 500 once one has run far past every request's timeout (a
deadlock, a hung call outside the API client). A thread cannot be cancelled, so only the kubelet's
restart frees a stuck worker; with every worker stuck no job's status would move while the Lease
kept this operator the leader. The endpoint is kopf's own HTTP server with our probe handler; the
stuck sync is a real worker thread that waits."""
import asyncio
import threading
import time
import urllib.error
import urllib.request

import kopf
from kopf._core.engines.indexing import OperatorIndexers
from kopf._core.engines.probing import health_reporter

from kubelora_operator import handlers, syncer
from kubelora_trainer.dist import _free_port


def test_unhealthy_names_the_longest_stuck_sync_and_dead_workers():
    running = {("ns", "a"): 100.0, ("ns", "b"): 1000.0, ("ns", "c"): 50.0}
    assert syncer.unhealthy(running, now=1100.0, stuck_after=2000) is None
    assert syncer.unhealthy(running, now=1100.0, stuck_after=1000) == (
        "2 status sync(s) running for more than 1000 s (KUBELORA_SYNC_STUCK_SECONDS), the longest ns/c for 1050 s")
    assert syncer.unhealthy({}, now=0.0, stuck_after=1, workers_gone=2, ticker_gone=True) == (
        "2 sync worker(s) ended; the sync ticker ended")
    assert syncer.unhealthy({}, now=0.0, stuck_after=1) is None


def _get(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def _until(port, status, deadline=90.0):
    """The endpoint's answer, asked until it is `status` (kopf keeps a probe's result 10 s)."""
    end = time.monotonic() + deadline
    while True:
        got = await asyncio.to_thread(_get, port)
        if got == status or time.monotonic() > end:
            return got
        await asyncio.sleep(0.5)


def test_a_stuck_sync_fails_the_liveness_endpoint_and_a_finished_one_clears_it(monkeypatch, caplog):
    monkeypatch.setattr(handlers, "SYNC_STUCK_SECONDS", 1.0)
    release = threading.Event()

    async def main():
        memo = kopf.Memo()
        memo.syncer = syncer.Syncer(lambda body, remember: release.wait(300), interval=0.2, workers=1)
        memo.syncer.start()
        port, ready = _free_port(), asyncio.Event()
        server = asyncio.create_task(health_reporter(
            f"http://127.0.0.1:{port}/healthz", memo=memo, indices=OperatorIndexers().indices,
            registry=handlers.registry, settings=kopf.OperatorSettings(), ready_flag=ready))
        try:
            await ready.wait()
            healthy = await asyncio.to_thread(_get, port)
            memo.syncer.saw_owner("ADDED", {"metadata": {"namespace": "ns", "name": "hung", "uid": "u",
                                                         "resourceVersion": "1"}})
            stuck = await _until(port, 500)
            release.set()
            recovered = await _until(port, 200)
            return healthy, stuck, recovered
        finally:
            release.set()
            await memo.syncer.stop()
            server.cancel()

    assert asyncio.run(main()) == (200, 500, 200)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not live: ")]
    assert said and "the longest ns/hung for " in said[0], said


def test_an_ended_worker_or_ticker_makes_the_syncer_unhealthy_and_a_stop_does_not():
    async def main():
        s = syncer.Syncer(lambda body, remember: None, interval=0.2, workers=2)
        s.start()
        assert s.health(stuck_after=60) is None
        s.queue._tasks[0].cancel()   # a worker that ended (a bug: they run for the operator's life)
        s._ticker.cancel()
        await asyncio.sleep(0.1)
        ended = s.health(stuck_after=60)
        await s.stop()
        return ended, s.health(stuck_after=60)
    ended, stopped = asyncio.run(main())
    assert ended == "1 sync worker(s) ended; the sync ticker ended"
    assert stopped is None   # stopping on purpose (the operator's cleanup) is not a failure
