"""Handing a step to a deployment (``tasks.handoff``): the API's ``503`` (a write that lost a
race for a Prefect server's SQLite database) is sent again at once, not after Prefect's 2 s
back-off; the child run is created once and linked to the parent as a subflow."""

from __future__ import annotations

import asyncio
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tasks.handoff import BusyRetry, busy_retry_settings, create_subflow, stop_run


class _Scripted:
    """An HTTP server on 127.0.0.1 answering POSTs with the statuses it is given, in order
    (then 200), and keeping each request body it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                outer.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                status = outer.statuses.pop(0) if outer.statuses else 200
                payload = str(status).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def _post(url: str, transport: httpx.AsyncBaseTransport) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.post(url, json={"name": "child"})

    return asyncio.run(go())


@pytest.mark.parametrize(
    "statuses, answer, sent",
    [
        ([503, 503], 200, 3),  # busy twice: sent again, the third answer is the client's
        ([500, 503], 500, 1),  # anything but 503 goes back at once
        ([404], 404, 1),
        ([503] * 5, 503, 3),  # out of delays: the last 503 is the client's to retry
    ],
)
def test_busy_retry_sends_again_only_while_busy(statuses, answer, sent):
    with _Scripted(statuses) as server:
        response = _post(server.url, BusyRetry(httpx.AsyncHTTPTransport(), delays=(0.0, 0.0)))
        assert response.status_code == answer
        assert len(server.bodies) == sent
        assert set(server.bodies) == {b'{"name":"child"}'}  # the same body each time


def test_the_client_that_creates_child_runs_sends_through_busy_retry(prefect_api):
    """The transport goes in through the Prefect client's public ``httpx_settings``."""
    from prefect.client.orchestration import get_client

    chosen = busy_retry_settings()["transport"]
    assert isinstance(chosen, BusyRetry) and isinstance(chosen.inner, httpx.AsyncHTTPTransport)

    async def go() -> object:
        async with get_client(httpx_settings={"transport": chosen}) as client:
            return await client.api_healthcheck()

    assert asyncio.run(go()) is None  # the API answers through it


def test_child_run_is_created_once_and_linked_while_the_api_is_busy(prefect_api, monkeypatch):
    """The first two attempts to create the subflow's task run and the child run each get a
    503; with the Prefect client's own retries off, only the quick retries can create them."""
    from fault_proxy import FaultProxy
    from prefect import flow, runtime
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    name = f"handoff-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("handoff-child")
        deployment_id = client.create_deployment(flow_id=flow_id, name=name)
    api = httpx.URL(PREFECT_API_URL.value())
    proxy = FaultProxy((api.host, api.port)).start()
    try:
        task_runs = proxy.fail("POST", "/api/task_runs/", 2, mode="503")
        create = proxy.fail("POST", f"/api/deployments/{deployment_id}/create_flow_run", 2, "503")

        @flow(name="handoff-parent")
        def parent() -> tuple[object, str]:
            with temporary_settings(
                {PREFECT_API_URL: f"{proxy.url}/api", PREFECT_CLIENT_MAX_RETRIES: 0}
            ):
                child = create_subflow(f"handoff-child/{name}", {})
            return child, runtime.flow_run.id

        child, parent_id = parent()
    finally:
        proxy.stop()

    assert (task_runs.hits, create.hits) == (2, 2)
    assert str(child.deployment_id) == str(deployment_id)
    assert child.state is not None and child.state.is_scheduled()  # created, not waited for
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
        assert [r.id for r in runs] == [child.id]  # created once
        assert child.parent_task_run_id is not None  # a subflow of the parent run
        link = client.read_task_run(child.parent_task_run_id)
        assert str(link.flow_run_id) == str(parent_id)


def _runs_of_new_deployment(name: str):
    """Create deployment ``repartition/<name>`` (no worker serves it); returns a function that
    lists its runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("repartition")
        deployment_id = client.create_deployment(flow_id=flow_id, name=name)

    def runs() -> list:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )

    return runs


def test_a_run_that_fails_cancels_the_repartition_run_it_started(
    prefect_api, tmp_path, work_dir, monkeypatch
):
    """Deployed, ``convert`` creates the repartition run before it lists its source; when the
    run then fails (here: the destination exists), it cancels that run, which no worker took."""
    from flow_helpers import make_sample

    from flows.convert import convert_vit

    name = f"no-worker-{uuid.uuid4().hex[:6]}"
    runs = _runs_of_new_deployment(name)
    monkeypatch.setenv("CKPT_REPARTITION_DEPLOYMENT", f"repartition/{name}")
    monkeypatch.setenv("CKPT_SCRATCH_URL", str(tmp_path / "scratch"))
    sample = make_sample(tmp_path, None, None, tp=2)
    taken = tmp_path / "taken.nemo"
    taken.write_bytes(b"someone else's model")
    state = convert_vit(
        repartition="deployment", source=sample.url, destination=str(taken), return_state=True
    )
    assert state.is_failed() and "exists" in state.message
    (child,) = runs()  # created before the listing, then cancelled
    assert child.state is not None and child.state.is_cancelled()
    assert child.parameters["output_url"].startswith(str(tmp_path / "scratch"))
    assert stop_run(child.id) is None  # final: nothing left to cancel
    assert taken.read_bytes() == b"someone else's model"
