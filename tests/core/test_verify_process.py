"""``ckptcore.verify_process``: ``api.verify`` in a child started ahead of time gives the same
report, raises the same one-line errors, and never outlives its parent's pipe."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import local_s3

from ckptcore import api
from ckptcore.errors import CkptError
from ckptcore.sample import vit_config, write_nemo
from ckptcore.verify_process import VerifyProcess, VerifyProcessGone


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("verify-process")
    a, b = str(tmp / "a.nemo"), str(tmp / "b.nemo")
    write_nemo(a, vit_config("tiny"))
    api.convert(a, b, target_tp=2)
    return a, b


def test_the_child_reports_what_verify_reports(pair) -> None:
    a, b = pair
    with VerifyProcess() as proc:
        for run_both in (False, True):
            got = proc.verify(a, b, images=2, run_both=run_both)
            assert got == api.verify(a, b, images=2, run_both=run_both)
        assert got.method == "logits" and got.passed and got.device == "cpu"


def test_a_user_error_in_the_child_is_a_one_line_ckpt_error(pair, tmp_path) -> None:
    _, b = pair
    missing = str(tmp_path / "nothing-here")
    with VerifyProcess() as proc:
        with pytest.raises(CkptError) as info:
            proc.verify(missing, b)
        assert info.value.path == missing and "\n" not in str(info.value)
        assert proc.alive()  # and it serves the next request
        assert proc.verify(*pair, images=1).passed


def test_a_dead_child_is_reported_before_sending(pair) -> None:
    proc = VerifyProcess()
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc._proc.wait()
        with pytest.raises(VerifyProcessGone, match=str(proc.pid)):
            proc.verify(*pair)
    finally:
        proc.close()


@pytest.mark.parametrize("wait", [True, False])
def test_the_child_exits_when_its_parent_closes_the_pipe(wait) -> None:
    proc = VerifyProcess()
    proc.close(timeout=60, wait=wait)
    assert proc._proc.wait(60) == 0


def test_each_request_takes_the_parents_storage_settings(pair) -> None:
    """A process serving several runs must not keep the endpoint and credentials it started
    with: this one starts before the S3 server exists, then reads from it, then from another."""
    a, b = pair
    with VerifyProcess() as proc:
        assert proc.verify(a, b, images=1).passed
        for bucket in ("models-1", "models-2"):  # a new server (new port) each time
            with local_s3(bucket) as fs:
                fs.put(a, f"{bucket}/a.nemo")
                assert proc.verify(f"s3://{bucket}/a.nemo", b, images=1).passed


def test_the_child_asks_the_stores_of_the_warm_urls_while_idle(pair, monkeypatch) -> None:
    """Given the run's URLs, the child makes its storage client and asks the store once before
    any request (what a first verify in a process would pay for); the store's answer, here a
    404 from a stand-in endpoint, is the request's to report, and the child serves on."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Store(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self) -> None:
            seen.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Store)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        with VerifyProcess(warm=["s3://runs/out.nemo", pair[0]]) as proc:
            deadline = time.monotonic() + 120
            while not any(p.startswith("/runs") for p in seen) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert any(p.startswith("/runs/out.nemo") for p in seen), seen
            assert proc.verify(*pair, images=1).passed
    finally:
        server.shutdown()
        server.server_close()
