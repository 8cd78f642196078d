"""Handing a step to another deployment: create its run as a subflow, wait until it ends.

:func:`create_subflow` and :func:`wait_for_run` do what
``prefect.deployments.run_deployment(..., as_subflow=True)`` does, in two calls (the parent
works in between), with one difference: the run is created through a client that sends the
API's ``503`` answers again after 50 ms, 100 ms, ... instead of the Prefect client's 2 s, 4 s,
... back-off. :func:`stop_run` cancels a run the parent no longer needs.

Why: a Prefect server on SQLite (the local stack, any server without Postgres) answers
``503`` when a write transaction lost a race with another writer (``SQLITE_BUSY_SNAPSHOT``).
Creating the child run after the parent's first tasks raced with the server recording those
task runs from their events, and in the local stack it lost about every other time: 2 s more,
twice that when it lost again (measured with the parent's client in debug mode, 7 of 16 runs). The server rolled
the write back, so sending it again is what the Prefect client does anyway, only later.
Waiting for the run to end is plain polling through the usual client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.states import Cancelled, Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync

BUSY = 503
BUSY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)


class BusyRetry(httpx.AsyncBaseTransport):
    """Sends a request again while the server answers ``503``, after each of ``delays``;
    the last answer goes back to the client whatever it is (its own retries then apply)."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, delays: Sequence[float] = BUSY_DELAYS
    ) -> None:
        self.inner = inner
        self.delays = tuple(delays)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for delay in self.delays:
            response = await self.inner.handle_async_request(request)
            if response.status_code != BUSY:
                return response
            await response.aclose()
            await asyncio.sleep(delay)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def retry_busy(client: PrefectClient) -> bool:
    """Put :class:`BusyRetry` in front of the transport ``client`` uses for its API.

    The Prefect client adjusts its transport the same way after creating it (httpx offers no
    public way to wrap the transport it chose, proxies included). ``False`` (and the client
    left as it was) where those internals are not as expected."""
    http = getattr(client, "_client", None)
    pick = getattr(http, "_transport_for_url", None)
    if not isinstance(http, httpx.AsyncClient) or not callable(pick):
        return False
    chosen = pick(http.base_url)
    if isinstance(chosen, BusyRetry):
        return True
    if getattr(http, "_transport", None) is chosen:
        http._transport = BusyRetry(chosen)
        return True
    mounts = getattr(http, "_mounts", None)
    if isinstance(mounts, dict):
        for pattern, transport in mounts.items():
            if transport is chosen:
                mounts[pattern] = BusyRetry(chosen)
                return True
    return False


async def _create(name: str, parameters: dict[str, Any]) -> FlowRun:
    async with get_client() as client:
        retry_busy(client)
        return await arun_deployment(
            name, client=client, parameters=parameters, timeout=0, as_subflow=True
        )


def create_subflow(name: str, parameters: dict[str, Any]) -> FlowRun:
    """Create a run of deployment ``name`` as a subflow of the current flow (or task) run;
    returns it at once (scheduled)."""
    run = run_coro_as_sync(_create(name, parameters))
    assert run is not None
    return run


def wait_for_run(run_id: UUID, poll_seconds: float, timeout: float | None) -> FlowRun:
    """The run once it is final, or as it is when ``timeout`` seconds have passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            if deadline is not None and time.monotonic() >= deadline:
                return run
            time.sleep(poll_seconds)


def stop_run(run_id: UUID) -> str | None:
    """Cancel the run unless it is final: a run no worker has taken yet is cancelled, one
    that may be running is set cancelling (its worker stops its process). The state it was
    in, or None when it was final already."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.state is None or run.state.is_final():
            return None
        cancel = Cancelled() if run.state.is_scheduled() else Cancelling()
        client.set_flow_run_state(run_id, cancel, force=True)
        return run.state.name
