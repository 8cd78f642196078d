"""A small HTTP proxy on 127.0.0.1 in front of an S3 server that fails chosen requests.

Requests pass through unchanged (keep-alive, Content-Length or chunked bodies) except the
first ``count`` that match a rule, which get a real S3 ``500 InternalError`` response, the
``503`` a Prefect server answers when a write lost a race for its SQLite database, a closed
connection, or are held until released (to kill the client mid-upload). It also counts
the body bytes it relays, so a test can see what a client really fetched. Tests point
``AWS_ENDPOINT_URL_S3`` at :attr:`FaultProxy.url`.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERROR_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again. (injected)</Message>"
    b"<RequestId>fault-proxy</RequestId></Error>"
)
_FAILURES = {  # mode: (status, content type, body)
    "500": (500, "application/xml", _ERROR_XML),
    "503": (503, "application/json", b'{"exception_message": "Service Unavailable"}'),
}
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Rule:
    """Fail ``count`` requests with ``method`` whose path starts with ``prefix`` (after ``skip``)."""

    method: str
    prefix: str
    count: int
    skip: int = 0
    mode: str = "500"  # "500": S3 InternalError; "503": Prefect's busy; "drop"; "hold": wait
    hits: int = 0
    failed: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """Forward HTTP to ``upstream`` (``host:port``); inject failures per :class:`Rule`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        self.body_bytes: list[tuple[str, str, int]] = []  # (method, path, response body bytes)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                rule = proxy._match(self.command, self.path)
                if rule is not None and rule.mode == "hold":
                    rule.release.wait(120)  # the test kills the client meanwhile
                    rule = None
                if rule is not None and rule.mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if rule is not None:
                    status, content_type, payload = _FAILURES[rule.mode]
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_HEADERS and k.lower() != "content-length":
                        self.send_header(k, v)
                # HEAD: the length of the body a GET would get (the object's size)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy._lock:
                        proxy.body_bytes.append((self.command, self.path, len(data)))
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, method: str, prefix: str, count: int, mode: str = "500", skip: int = 0) -> Rule:
        rule = Rule(method.upper(), prefix, count, skip=skip, mode=mode)
        with self._lock:
            self.rules.append(rule)
        return rule

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.seen.append((method, path))
            for rule in self.rules:
                if method != rule.method or not path.startswith(rule.prefix):
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                if rule.hits < rule.count:
                    rule.hits += 1
                    rule.failed.append(path)
                    return rule
        return None

    def bytes_read(self, prefix: str) -> int:
        """Body bytes of the GET responses for paths starting with ``prefix`` (``/bucket/key``)."""
        with self._lock:
            return sum(n for m, p, n in self.body_bytes if m == "GET" and p.startswith(prefix))

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        for rule in self.rules:
            rule.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
