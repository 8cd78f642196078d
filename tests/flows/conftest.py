"""Fixtures for the Prefect layer: a real S3 server (moto on 127.0.0.1), a real Prefect API
(``prefect_test_harness``), sample training checkpoints uploaded to S3.

Retry delays are zeroed here, before ``tasks`` is imported (Prefect fixes them on the
decorators); s3fs finds the server through ``AWS_ENDPOINT_URL_S3`` alone.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

os.environ["CKPT_RETRY_BACKOFF"] = "0"
os.environ.setdefault("CKPT_RETRIES", "3")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from flow_helpers import BUCKETS, Sample, clear_s3_cache, make_sample  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: real processes (Prefect server, workers, moto); part of make test"
    )


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port) with the pipeline's buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL_S3", url)
        clear_s3_cache()
        import fsspec

        fs = fsspec.filesystem("s3")
        for bucket in BUCKETS:
            fs.mkdir(bucket)
        try:
            yield url
        finally:
            clear_s3_cache()
            server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """An s3fs filesystem on the moto server; the endpoint is set in the environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    clear_s3_cache()
    import fsspec

    yield fsspec.filesystem("s3")
    clear_s3_cache()


@pytest.fixture
def proxy(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A fault-injecting, byte-counting proxy in front of moto; s3fs talks to it through the
    environment."""
    from fault_proxy import FaultProxy

    host, port = moto_endpoint.removeprefix("http://").split(":")
    p = FaultProxy((host, int(port))).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)
    clear_s3_cache()
    yield p
    clear_s3_cache()
    p.stop()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server and database for the whole session (~15 s to start)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """Multipart parts of 8 KiB, in the pipeline and in the moto server (S3's minimum is
    5 MiB), so that tiny models make archives of many parts; the store still refuses a short
    part that is not the last."""
    import moto.s3.models

    size = 8192
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", size)
    monkeypatch.setenv("CKPT_MIN_PART_BYTES", str(size))
    return size


@pytest.fixture
def work_dir(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``CKPT_WORK_DIR`` for the test."""
    path = tmp_path / "work"
    monkeypatch.setenv("CKPT_WORK_DIR", str(path))
    return str(path)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix unique to the test, so tests share buckets without seeing each other."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def sample_factory(tmp_path):
    def factory(s3fs_or_none, url: str | None, **kw) -> Sample:
        return make_sample(tmp_path, s3fs_or_none, url, **kw)

    return factory
