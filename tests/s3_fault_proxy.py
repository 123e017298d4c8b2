"""A fault-injecting HTTP proxy between an S3 client and a real S3 server (the tests' SeaweedFS).

The client's endpoint_url is the proxy; each request is forwarded unchanged (method, path, every
header but the hop-by-hop ones, Host included; bodies streamed) to the upstream server, so SigV4
signatures made for the proxy's address verify there. A test arms faults that apply to the requests they match
(S3 operation or HTTP method, and an fnmatch pattern on the object key), the first `times` of them
or all (times=None):

    status    answer with an S3 XML error (503 SlowDown, 500 InternalError, ...); nothing forwarded
    delay     forward, then wait `seconds` before answering (after `after_bytes` body bytes if set)
    drop      close the client's connection without an answer: at="request" after forwarding only
              half the request body upstream (a PUT or UploadPart cut midway), at="response" after
              the server has done the work (its answer is lost)
    truncate  forward, send the answer's headers (Content-Length N) and only `keep` bytes of the
              body, then close

Each Fault counts what it injected; `requests` logs every request as (operation, key, outcome),
outcome being the upstream status or the fault's kind. Path-style addressing only. Tests only.
"""
from __future__ import annotations

import fnmatch
import http.client
import socket
import socketserver
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect"}
PIECE = 256 * 1024


def s3_operation(method: str, target: str, headers) -> tuple[str, str, str]:
    """(operation, bucket, key) of a path-style S3 request. Pure."""
    url = urlsplit(target)
    q = parse_qs(url.query, keep_blank_values=True)
    bucket, _, key = unquote(url.path).lstrip("/").partition("/")
    copy = "x-amz-copy-source" in {k.lower() for k in headers.keys()}
    if not bucket:
        return "ListBuckets", "", ""
    if not key:
        if method == "GET":
            op = "ListObjectsV2" if q.get("list-type") == ["2"] else "ListObjects"
        elif method == "POST" and "delete" in q:
            op = "DeleteObjects"
        else:
            op = {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, method)
        return op, bucket, ""
    if method == "PUT":
        part = "partNumber" in q
        op = {(True, True): "UploadPartCopy", (True, False): "UploadPart", (False, True): "CopyObject",
              (False, False): "PutObject"}[part, copy]
    elif method == "POST":
        op = ("CreateMultipartUpload" if "uploads" in q else
              "CompleteMultipartUpload" if "uploadId" in q else "PostObject")
    elif method == "GET":
        op = "ListParts" if "uploadId" in q else "GetObject"
    elif method == "DELETE":
        op = "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    else:
        op = {"HEAD": "HeadObject"}.get(method, method)
    return op, bucket, key


@dataclass
class Fault:
    kind: str                          # status | delay | drop | truncate
    ops: tuple[str, ...] = ()          # S3 operations (GetObject, PutObject, UploadPart, ...); () = any
    method: Optional[str] = None       # or an HTTP method
    key: str = "*"                     # fnmatch pattern on the object key
    times: Optional[int] = None        # how many matching requests to fault; None = every one
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    seconds: float = 0.0               # delay
    after_bytes: Optional[int] = None  # delay: stall after this many body bytes instead of before the answer
    at: str = "request"                # drop: "request" (mid request body) or "response" (answer lost)
    keep: float = 0.5                  # truncate: fraction of the body sent
    injected: int = 0

    def matches(self, op: str, method: str, key: str) -> bool:
        return ((not self.ops or op in self.ops) and (self.method is None or self.method == method)
                and fnmatch.fnmatchcase(key, self.key) and (self.times is None or self.injected < self.times))


@dataclass
class Seen:
    op: str
    key: str
    outcome: object  # the upstream's status (int), or the fault's kind


class _Dropped(Exception):
    """The fault closed the client's connection; no answer is sent."""


class FaultProxy:
    def __init__(self, upstream: str):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._server: Optional[socketserver.ThreadingTCPServer] = None
        self.endpoint = ""

    # ---- what tests call

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def arm(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def fail(self, times=None, status=503, code="SlowDown", message="Please reduce your request rate.", **match):
        return self.arm(Fault("status", times=times, status=status, code=code, message=message, **match))

    def delay(self, seconds: float, times=None, after_bytes=None, **match):
        return self.arm(Fault("delay", times=times, seconds=seconds, after_bytes=after_bytes, **match))

    def drop(self, at="request", times=None, **match):
        return self.arm(Fault("drop", times=times, at=at, **match))

    def truncate(self, keep=0.5, times=None, **match):
        return self.arm(Fault("truncate", times=times, keep=keep, **match))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def seen(self, op: Optional[str] = None, key: str = "*") -> list[object]:
        """Outcomes of the requests so far for this operation and key pattern, in order."""
        with self.lock:
            return [s.outcome for s in self.requests
                    if (op is None or s.op == op) and fnmatch.fnmatchcase(s.key, key)]

    # ---- used by the handler

    def _take(self, op: str, method: str, key: str) -> Optional[Fault]:
        with self.lock:
            for f in self.faults:
                if f.matches(op, method, key):
                    f.injected += 1
                    return f
        return None

    def _log(self, op: str, key: str, outcome) -> Seen:
        seen = Seen(op, key, outcome)
        with self.lock:
            self.requests.append(seen)
        return seen


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (_Dropped, OSError, http.client.HTTPException):
            self.close_connection = True

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self._proxy
        raise AttributeError(name)

    # ---- one request

    def _proxy(self):
        op, _, key = s3_operation(self.command, self.path, self.headers)
        fault = self.owner._take(op, self.command, key)
        seen = self.owner._log(op, key, fault.kind if fault else "forwarded")
        if fault and fault.kind == "status":
            for _ in self._body():  # drained, so the connection stays usable
                pass
            return self._error(fault)
        if fault and fault.kind == "drop" and fault.at == "request":
            self._forward(cut_request=True)
        resp, upstream = self._forward()
        if fault is None:
            seen.outcome = resp.status
        try:
            if fault and fault.kind == "drop":
                raise _Dropped()
            if fault and fault.kind == "delay" and fault.after_bytes is None:
                self._wait(fault.seconds)
            self._answer(resp, keep=fault.keep if fault and fault.kind == "truncate" else None,
                         stall_at=fault.after_bytes if fault and fault.kind == "delay" else None,
                         stall_for=fault.seconds if fault else 0.0)
        finally:
            upstream.close()

    def _body(self):
        """The request body as it arrives, in pieces. botocore sends a Content-Length over plain
        http (aws-chunked bodies only over https), so chunked requests are not handled."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise NotImplementedError("chunked request bodies")
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            piece = self.rfile.read(min(left, PIECE))
            if not piece:
                raise _Dropped()
            left -= len(piece)
            yield piece

    def _forward(self, cut_request: bool = False):
        """Send the request upstream unchanged; return (response, connection). cut_request: forward
        half the body (at least a byte), then close both sides without an answer."""
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                conn.putheader(name, value)
        conn.endheaders()
        half = int(self.headers.get("Content-Length") or 0) // 2
        sent = 0
        for piece in self._body():
            if cut_request and sent + len(piece) >= half:
                conn.send(piece[:max(half - sent, 1)])
                break
            conn.send(piece)
            sent += len(piece)
        if cut_request:
            conn.close()
            raise _Dropped()
        return conn.getresponse(), conn

    def _answer(self, resp: http.client.HTTPResponse, keep: Optional[float] = None,
                stall_at: Optional[int] = None, stall_for: float = 0.0) -> None:
        """Relay the upstream's answer: all of it, or (keep) a fraction of the body announced by its
        Content-Length and then the connection closed, or (stall_at) with a pause after that many
        body bytes."""
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if length is None:  # (chunked upstream) sent whole, delimited by the end of the connection
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD" or resp.status in (204, 304):
            return
        limit = None if keep is None else int(int(length or 0) * keep)
        sent = 0
        while limit is None or sent < limit:
            piece = resp.read(PIECE if limit is None else min(PIECE, limit - sent))
            if not piece:
                break
            if stall_at is not None and sent <= stall_at < sent + len(piece):
                self.wfile.write(piece[:stall_at - sent])
                self._wait(stall_for)
                piece, sent = piece[stall_at - sent:], stall_at
            self.wfile.write(piece)
            sent += len(piece)
        if limit is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # FIN after the bytes sent: a short body
            raise _Dropped()

    def _wait(self, seconds: float) -> None:
        self.wfile.flush()
        self.owner.stopping.wait(seconds)

    def _error(self, fault: Fault) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(fault.code)}</Code>'
                f"<Message>{escape(fault.message)}</Message><Resource>{escape(self.path.split('?')[0])}</Resource>"
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response_only(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
