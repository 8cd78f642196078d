"""An HTTP proxy on 127.0.0.1 in front of moto's S3 server that breaks chosen requests.

Requests are forwarded unchanged, except those matching a :class:`Fault` (method, path prefix,
how many), which get one of:

- ``500``: an S3 ``InternalError`` response (the server never sees the request);
- ``drop``: the connection closed without an answer (the server never sees the request);
- ``cut``: forwarded, then the response cut off halfway through its body (a download dropping);
- ``lost``: forwarded (the server acts on it), then the connection closed before the answer.

s3fs finds the proxy through ``AWS_ENDPOINT_URL_S3``; nothing in ckptcore knows about it.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message>"
    b"<RequestId>hostile-proxy</RequestId></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Fault:
    method: str
    prefix: str
    mode: str  # 500 | drop | cut | lost
    count: int
    skip: int = 0  # let this many matching requests through first
    hits: list[str] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls per request

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(out)
                        out.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _close(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._match(self.command, self.path)
                mode = fault.mode if fault else None
                if mode == "drop":
                    return self._close()
                if mode == "500":
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERROR_XML)))
                    self.end_headers()
                    self.wfile.write(ERROR_XML)
                    return
                status, reason, headers, data = proxy._forward(
                    self.command, self.path, self.headers, body
                )
                if mode == "lost":
                    return self._close()
                self.send_response(status, reason)
                for k, v in headers:
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command == "HEAD":  # no body, but the object's length
                    length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "cut" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    return self._close()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, method: str, prefix: str, mode: str, count: int = 10**9, skip: int = 0) -> Fault:
        fault = Fault(method.upper(), prefix, mode, count, skip)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.method == method and path.startswith(fault.prefix):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    if len(fault.hits) < fault.count:
                        fault.hits.append(path)
                        return fault
        return None

    def _forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP}
            if body or method in ("PUT", "POST"):
                fwd["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=fwd)
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
