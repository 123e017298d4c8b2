"""The operator's reads of a tenant's output (artifacts.read_json): bounded in memory, in time and
in clients kept; every failure an error string; nothing echoed of an answer that is not S3's; only
known progress fields of their kind reach the status.

Against the real S3 server (SeaweedFS) where it can hold the case (a large object, JSON that is not
an object, S3's own errors). A server that never answers, hangs up, or is not S3 at all is what
SeaweedFS cannot be: those run against a socket or a small HTTP server here."""
import http.server
import socket
import threading
import time

import pytest

from kubelora_operator import artifacts
from kubelora_operator import status as st
from kubelora_trainer.storage import S3Settings, server_words


@pytest.fixture()
def bucket(s3):
    from kubelora_trainer.storage import ensure_bucket
    ensure_bucket(s3, "op-reads")  # the server lives for the session
    return "op-reads"


def _settings(s3) -> S3Settings:
    return S3Settings(endpoint=s3.env["AWS_ENDPOINT_URL"], addressing_style="path")


def test_the_operator_has_its_own_short_timeouts_and_attempts(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("KUBELORA_S3_READ_TIMEOUT", "60")
    job = S3Settings(endpoint="http://x")
    assert (job.max_attempts, job.read_timeout) == (5, 60.0)  # the trainer's
    op = artifacts.operator_settings(job)
    assert (op.max_attempts, op.read_timeout, op.connect_timeout) == (2, 10.0, 5.0) and op.endpoint == "http://x"
    smaller = artifacts.operator_settings(S3Settings(max_attempts=1, read_timeout=2.0))
    assert (smaller.max_attempts, smaller.read_timeout) == (1, 2.0)


def test_an_object_over_the_limit_is_refused_by_its_size(s3, bucket):
    s3.put_object(Bucket=bucket, Key="run/status/progress.json", Body=b" " * (artifacts.MAX_BYTES + 1))
    got, error = artifacts.read_json(f"s3://{bucket}/run", "status/progress.json", _settings(s3))
    assert got is None and error == (f"reading s3://{bucket}/run/status/progress.json: status/progress.json is "
                                     f"{artifacts.MAX_BYTES + 1} bytes (limit 1 MiB)")
    s3.put_object(Bucket=bucket, Key="run/status/progress.json", Body=b'{"step": 3}')
    assert artifacts.read_json(f"s3://{bucket}/run", "status/progress.json", _settings(s3)) == ({"step": 3}, None)


def test_a_body_without_its_length_is_cut_at_the_limit_and_the_deadline():
    chunks = iter([b"x" * artifacts.MAX_BYTES, b"x", b"never read"])
    with pytest.raises(artifacts.TooLarge, match="more than 1048576 bytes"):
        artifacts.read_capped(lambda n: next(chunks), "manifest.json", deadline=float("inf"))
    ticks = iter([0.0, 30.0])
    with pytest.raises(artifacts.TooLarge, match="took more than 20 s"):
        artifacts.read_capped(lambda n: b"x", "manifest.json", deadline=20.0, clock=lambda: next(ticks))
    parts = iter([b'{"a"', b": 1}", b""])
    assert artifacts.read_capped(lambda n: next(parts), "m", deadline=float("inf")) == b'{"a": 1}'


def test_json_that_is_not_an_object_is_an_error(s3, bucket, tmp_path):
    for body, want in ((b"[1, 2]", "not a JSON object (a list)"), (b'"text"', "not a JSON object (a str)"),
                       (b"null", "not a JSON object (a NoneType)"), (b"[" * 200_000, "not JSON"),
                       (b"\xff\xfe", "not JSON")):
        s3.put_object(Bucket=bucket, Key="j/manifest.json", Body=body)
        got, error = artifacts.read_json(f"s3://{bucket}/j", "manifest.json", _settings(s3))
        assert got is None and error.startswith(f"reading s3://{bucket}/j/manifest.json: {want}"), error
    (tmp_path / "manifest.json").write_bytes(b"[]")  # a local output alike
    assert artifacts.read_json(str(tmp_path), "manifest.json", _settings(s3))[1].endswith("not a JSON object (a list)")
    assert artifacts.read_json(str(tmp_path / "none"), "manifest.json", _settings(s3)) == (None, None)


def test_s3_errors_are_named_on_the_real_server(s3, bucket):
    assert artifacts.read_json(f"s3://{bucket}/nothing", "manifest.json", _settings(s3)) == (None, None)
    got, error = artifacts.read_json("s3://op-no-such-bucket/run", "manifest.json", _settings(s3))
    assert error == "reading s3://op-no-such-bucket/run/manifest.json: bucket 'op-no-such-bucket' does not exist"


def _listener(answer):
    """A socket on localhost; each connection is given to answer(conn) in a thread. Returns
    (port, accepted connections)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted = []

    def serve():
        while True:
            conn, _ = srv.accept()
            accepted.append(conn)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], accepted


def test_an_endpoint_that_never_answers_or_hangs_up_costs_two_short_attempts_and_is_an_error(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    silent, accepted = _listener(lambda conn: None)  # accepts, never answers
    t = time.monotonic()
    got, error = artifacts.read_json("s3://b/run", "status/progress.json",
                                     S3Settings(endpoint=f"http://127.0.0.1:{silent}", addressing_style="path",
                                                read_timeout=0.5, access_key="a", secret_key="b"))
    took = time.monotonic() - t
    assert got is None and "did not answer in time" in error and "the operator waits" in error, error
    assert len(accepted) == 2 and took < 5, (len(accepted), took)   # 2 attempts of 0.5 s, not 5 of 60 s

    closing, _ = _listener(lambda conn: conn.close())  # botocore's ConnectionClosedError: no .response
    got, error = artifacts.read_json("s3://b/run", "status/progress.json",
                                     S3Settings(endpoint=f"http://127.0.0.1:{closing}", addressing_style="path",
                                                access_key="a", secret_key="b"))
    assert got is None and error.startswith("reading s3://b/run/status/progress.json: "), error


class _NotS3(http.server.BaseHTTPRequestHandler):
    ANSWERS = {
        "xml": (403, b"<Error><Code>Denied</Code><Message>internal-db-password=hunter2</Message></Error>"),
        "html": (400, b"<html>admin console token=abc123</html>"),
        "known": (400, b"<Error><Code>InvalidRequest</Code><Message>" + b"m" * 300 + b"</Message></Error>"),
    }

    def log_message(self, *a):
        pass

    def do_GET(self):
        code, body = self.ANSWERS[self.path.split("/")[2]]
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_answer_that_is_not_s3s_is_not_echoed(monkeypatch):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotS3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        settings = S3Settings(endpoint=f"http://127.0.0.1:{srv.server_port}", addressing_style="path",
                              max_attempts=1, access_key="a", secret_key="b")
        xml = artifacts.read_json("s3://b/xml", "status/progress.json", settings)[1]
        html = artifacts.read_json("s3://b/html", "status/progress.json", settings)[1]
        known = artifacts.read_json("s3://b/known", "status/progress.json", settings)[1]
    finally:
        srv.shutdown()
    assert "hunter2" not in xml and "Denied" not in xml and xml.endswith(": HTTP 403, not an S3 error answer "
                                                                        "(not shown: is storage.endpoint an S3 store?)")
    assert "abc123" not in html and "HTTP 400" in html
    assert known.endswith(": InvalidRequest: " + "m" * 100 + "...")


def test_server_words():
    assert server_words("Weird", "SECRET", 400, echo=True) == "Weird: SECRET"  # the trainer: its own endpoint
    assert server_words("Weird", "SECRET", 400, echo=False).startswith("HTTP 400, not an S3 error answer")
    assert server_words("SlowDown", "reduce your rate", 503, echo=False) == "SlowDown: reduce your rate"
    assert server_words("404", "", 404, echo=False) == "HTTP 404"


def test_clients_kept_are_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(artifacts, "MAX_CLIENTS", 3)
    monkeypatch.setattr(artifacts, "_clients", type(artifacts._clients)())
    made = [artifacts.client_for(S3Settings(endpoint=f"http://127.0.0.1:{9000 + i}", access_key="a", secret_key="b"))
            for i in range(3)]
    again = artifacts.client_for(S3Settings(endpoint="http://127.0.0.1:9000", access_key="a", secret_key="b"))
    assert again is made[0]  # cached, and now the most recent
    artifacts.client_for(S3Settings(endpoint="http://127.0.0.1:9003", access_key="a", secret_key="b"))
    ports = [k[0].rsplit(":", 1)[1] for k in artifacts._clients]
    assert ports == ["9002", "9000", "9003"]  # 9001, least recently used, dropped


def test_progress_keeps_known_fields_of_their_kind():
    raw = {"step": 7, "totalSteps": 9, "epoch": True, "loss": float("nan"), "samplesPerSecond": float("inf"),
           "gpuPeakGiB": 3.5, "evalLoss": -float("inf"), "eta": "INTERNAL-JSON-ECHOED-" + "x" * 40,
           "resumedFrom": "6", "samples": 4.5, "sampleStep": [5], "evalStep": 0, "phase": "Training",
           "secret": "hunter2", "loss2": {"any": "object"}}
    assert st.progress_summary(raw) == {"step": 7, "totalSteps": 9, "gpuPeakGiB": 3.5, "evalStep": 0, "summary": "7/9"}
    assert st.progress_summary({"step": 2, "totalSteps": 4, "loss": 0.25, "eta": "3:10"}) == \
        {"step": 2, "totalSteps": 4, "loss": 0.25, "eta": "3:10", "summary": "2/4"}
    for eta in ("1:02:03", "?", "0:05"):
        assert st.progress_summary({"eta": eta}) == {"eta": eta}
    for eta in ("SECRET", "1:02:03x", "x1:02", "", "1:02\n"):
        assert st.progress_summary({"eta": eta}) == {}
    assert st.progress_summary({"step": "x", "totalSteps": 4})["summary"] == "0/4"
    assert st.progress_summary({"totalSteps": "9"}) == {}


def test_a_manifest_of_another_shape_does_not_break_observe():
    job = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    for manifest in ({"artifacts": "x"}, {"artifacts": ["x", {"uri": 5}], "report": "r", "metrics": [1],
                                          "adapter": "full"}, {"cacheOnly": True, "cache": [1]}):
        obs = st.observe(job, [], None, manifest, False)
        assert obs.phase == st.SUCCEEDED and obs.artifacts == []
    good = {"artifacts": [{"uri": "s3://b/o/a.safetensors", "format": "diffusers", "sha256": "s", "size": 2}],
            "report": {"uri": "s3://b/o/report.html", "sha256": "r", "size": 1}}
    assert st.published(good) == [{"uri": "s3://b/o/a.safetensors", "format": "diffusers", "sha256": "s", "size": 2},
                                  {"uri": "s3://b/o/report.html", "format": "report", "sha256": "r", "size": 1}]
    # a manifest that lists thousands (or huge texts) would make a status the API server refuses
    flood = {"artifacts": [{"uri": f"s3://b/o/{i}.safetensors", "format": "x" * 5000} for i in range(5000)]
             + [{"uri": "s3://b/" + "k" * 5000}], "report": good["report"]}
    arts = st.published(flood)
    assert len(arts) == st.MAX_ARTIFACTS and arts[-1]["format"] == "report" and arts[0]["format"] is None
    assert len(str(arts)) < 10_000


class _Trickle(http.server.BaseHTTPRequestHandler):
    """An endpoint that announces a small body and sends it a byte at a time (SeaweedFS cannot)."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


def test_a_body_trickled_a_byte_at_a_time_is_cut_at_the_deadline(monkeypatch):
    """Each byte came within the read timeout, so a read of 64 KiB waited for all of them: the
    deadline was checked only between such reads (a sync held for 20 s here, for days at one byte
    per 9 s). Reads now return after each receive."""
    monkeypatch.setattr(artifacts, "BODY_DEADLINE", 2.0)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        settings = S3Settings(endpoint=f"http://127.0.0.1:{srv.server_port}", addressing_style="path",
                              read_timeout=1.0, max_attempts=1, access_key="a", secret_key="b")
        t0 = time.monotonic()
        body, error = artifacts.read_json("s3://b/run", "status/progress.json", settings)
        took = time.monotonic() - t0
    finally:
        srv.shutdown()
    assert body is None and "took more than 2 s to read" in error, error
    assert took < 12, took   # the deadline plus at most one read timeout, not the 20 s of the whole trickle


def test_a_silent_endpoint_holds_one_read_not_one_per_job():
    """Through the real client against a socket that accepts and never answers: the first job's read
    fails after its two short attempts, marked as the store not answering; the other jobs of that
    store get that error at once instead of each holding a sync worker for as long."""
    silent, accepted = _listener(lambda conn: None)
    settings = S3Settings(endpoint=f"http://127.0.0.1:{silent}", addressing_style="path", read_timeout=0.5,
                          access_key="a", secret_key="b")
    backoff = artifacts.ReadBackoff(first=60)
    store = artifacts.store_of("s3://shared/run", settings)
    got, error = backoff.read(("job-0", "progress"), lambda: artifacts.read_json(
        "s3://shared/job-0", "status/progress.json", settings), store)
    assert got is None and error.unreachable and len(accepted) == 2, error
    t = time.monotonic()
    for i in range(1, 9):
        got, error = backoff.read((f"job-{i}", "progress"), lambda: artifacts.read_json(
            f"s3://shared/job-{i}", "status/progress.json", settings), store)
        assert got is None and error.startswith("bucket shared at http://127.0.0.1:") and "ReadTimeoutError" in error
    assert time.monotonic() - t < 1 and len(accepted) == 2   # no connection more, no wait
