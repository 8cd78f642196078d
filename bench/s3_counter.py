"""A byte-counting HTTP proxy in front of an S3 server, for benchmarks.

Every request is streamed through to the upstream S3 endpoint unchanged (keep-alive,
``Content-Length`` or chunked bodies, ``Expect: 100-continue``); the proxy counts, per HTTP
method, the requests, the response body bytes (what a GET *read from S3*) and the request body
bytes (what a PUT/POST *wrote to S3*), plus per object the bytes GETs returned. Point the
clients' ``AWS_ENDPOINT_URL_S3`` at the proxy: the counts are what went over the wire, not
what the clients say they read. A response the client hangs up on (s3fs's ``get`` opens a
whole-object GET and closes it to download in parts) counts the bytes relayed before that,
and the request counts as ``aborted``.

Control paths (never valid S3 bucket names, so they cannot clash with objects):

- ``GET /__counter__``: the counters as JSON;
- ``POST /__counter__/reset``: zero them (answers the counters before the reset).

Run it in its own process (``python bench/s3_counter.py --upstream http://127.0.0.1:PORT``;
it prints its URL on stdout), so relaying does not share a GIL with what is measured;
:func:`start_proxy_process`, :func:`read_counters` and :func:`reset_counters` do that from Python.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 20
CONTROL = "/__counter__"
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "expect"}


class Counters:
    """Thread-safe counters of the traffic through the proxy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> dict:
        with self._lock:
            before = self._snapshot_locked() if hasattr(self, "requests") else {}
            self.requests: dict[str, int] = {}
            self.response_bytes: dict[str, int] = {}
            self.request_bytes: dict[str, int] = {}
            self.get_by_object: dict[str, list[int]] = {}  # key -> [requests, bytes]
            self.get_seconds = 0.0  # summed over GETs: request sent -> last body byte relayed
            self.errors = 0  # answers >= 400
            self.aborted = 0  # requests whose client or upstream went away mid-way
            self.since = time.time()
        return before

    def add(
        self,
        method: str,
        path: str,
        sent: int,
        received: int,
        status: int,
        secs: float,
        aborted: bool = False,
    ) -> None:
        with self._lock:
            self.aborted += aborted
            self.requests[method] = self.requests.get(method, 0) + 1
            self.request_bytes[method] = self.request_bytes.get(method, 0) + sent
            self.response_bytes[method] = self.response_bytes.get(method, 0) + received
            if status >= 400:
                self.errors += 1
            if method == "GET":
                self.get_seconds += secs
                key = urllib.parse.urlsplit(path).path
                entry = self.get_by_object.setdefault(key, [0, 0])
                entry[0] += 1
                entry[1] += received

    def _snapshot_locked(self) -> dict:
        return {
            "since": self.since,
            "requests": dict(self.requests),
            "response_bytes": dict(self.response_bytes),
            "request_bytes": dict(self.request_bytes),
            # what was read from / written to S3: GET bodies / PUT+POST bodies
            "read_bytes": self.response_bytes.get("GET", 0),
            "written_bytes": self.request_bytes.get("PUT", 0) + self.request_bytes.get("POST", 0),
            "get_seconds": self.get_seconds,
            "errors": self.errors,
            "aborted": self.aborted,
            "get_by_object": {k: {"requests": n, "bytes": b} for k, (n, b) in self.get_by_object.items()},
        }  # fmt: skip

    def snapshot(self) -> dict:
        with self._lock:
            return self._snapshot_locked()


class CountingProxy:
    """A threaded HTTP proxy to ``upstream`` (``host``, ``port``) that counts bytes."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.counters = Counters()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered for us

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _control(self) -> None:
                if self.command == "POST" and self.path.rstrip("/") == CONTROL + "/reset":
                    body = proxy.counters.reset()
                else:
                    body = proxy.counters.snapshot()
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send_body(self, conn: http.client.HTTPConnection) -> int:
                """Stream the request body to ``conn``; returns its size."""
                sent = 0
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            conn.send(b"0\r\n\r\n")
                            return sent
                        data = self.rfile.read(size)
                        self.rfile.readline()
                        conn.send(b"%x\r\n" % len(data) + data + b"\r\n")
                        sent += len(data)
                left = int(self.headers.get("Content-Length") or 0)
                while left > 0:
                    data = self.rfile.read(min(CHUNK, left))
                    if not data:
                        raise ConnectionError("client closed the request body early")
                    conn.send(data)
                    sent += len(data)
                    left -= len(data)
                return sent

            def _relay(self) -> None:
                if self.path.startswith(CONTROL):
                    return self._control()
                start = time.perf_counter()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=600)
                sent = received = 0
                status, done = 0, False
                try:
                    conn.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP:
                            conn.putheader(k, v)
                    if chunked:
                        conn.putheader("Transfer-Encoding", "chunked")
                    conn.endheaders()
                    sent = self._send_body(conn)
                    resp = conn.getresponse()
                    status = resp.status
                    length = resp.getheader("Content-Length")
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    body = self.command != "HEAD" and resp.status not in (204, 304)
                    if length is not None:
                        self.send_header("Content-Length", length)
                    elif body:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        self.send_header("Content-Length", "0")
                    self.end_headers()
                    if body:
                        buf = bytearray(CHUNK)
                        view = memoryview(buf)
                        while True:
                            n = resp.readinto(view)
                            if not n:
                                break
                            if length is None:
                                self.wfile.write(b"%x\r\n" % n)
                            self.wfile.write(view[:n])
                            if length is None:
                                self.wfile.write(b"\r\n")
                            received += n  # relayed to the client
                        if length is None:
                            self.wfile.write(b"0\r\n\r\n")
                    else:
                        resp.read()
                    done = True
                except OSError:  # a client that hangs up mid-body (or an upstream that does)
                    self.close_connection = True
                finally:
                    conn.close()
                    proxy.counters.add(
                        self.command,
                        self.path,
                        sent,
                        received,
                        status,
                        time.perf_counter() - start,
                        aborted=not done,
                    )

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# -- client side --------------------------------------------------------------------------------


def read_counters(proxy_url: str) -> dict:
    with urllib.request.urlopen(proxy_url + CONTROL, timeout=30) as resp:
        return json.loads(resp.read())


def reset_counters(proxy_url: str) -> dict:
    req = urllib.request.Request(proxy_url + CONTROL + "/reset", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def start_proxy_process(upstream: str, python: str = sys.executable) -> Iterator[str]:
    """Run the proxy in its own process in front of ``upstream`` (``http://host:port``);
    yields its URL and stops it on exit."""
    proc = subprocess.Popen(
        [python, __file__, "--upstream", upstream],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"s3_counter did not start (said {url!r})")
        read_counters(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="the S3 endpoint, http://host:port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    args = ap.parse_args()
    up = urllib.parse.urlsplit(args.upstream)
    proxy = CountingProxy((up.hostname or "127.0.0.1", up.port or 80), args.host, args.port)
    proxy.start()
    print(proxy.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()


if __name__ == "__main__":
    main()
