"""Handing a step to another deployment: create its run as a subflow, wait until it ends.

:func:`create_subflow` and :func:`wait_for_run` do what
``prefect.deployments.run_deployment(..., as_subflow=True)`` does, in two calls (the parent
works in between), with one difference: the run is created through a client that sends the
API's ``503`` answers again after 50 ms, 100 ms, ... instead of the Prefect client's 2 s, 4 s,
... back-off (a transport given through the client's public ``httpx_settings``).
:func:`stop_run` cancels a run the parent no longer needs.

Why: a Prefect server on SQLite (the local stack, any server without Postgres) answers
``503`` when a write transaction lost a race with another writer (``SQLITE_BUSY_SNAPSHOT``).
Creating the child run after the parent's first tasks raced with the server recording those
task runs from their events, and in the local stack it lost about every other time: 2 s more,
twice that when it lost again (measured with the parent's client in debug mode, 7 of 16 runs). The server rolled
the write back, so sending it again is what the Prefect client does anyway, only later.
Waiting for the run to end follows its state events (Prefect's ``wait_for_flow_run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
from prefect import runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.exceptions import FlowRunWaitTimeout
from prefect.flow_runs import wait_for_flow_run
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync

from tasks import settings
from tasks.convert import keyed_folder
from tasks.lineage import RemoteRun

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


def busy_retry_settings() -> dict[str, Any]:
    """``httpx_settings`` for ``get_client``: the API is reached through :class:`BusyRetry`
    (over httpx's own transport with the connection retries the Prefect client uses). Empty
    for Prefect's ephemeral in-process API, which has no network transport to wrap."""
    if not str(PREFECT_API_URL.value() or "").startswith(("http://", "https://")):
        return {}
    return {"transport": BusyRetry(httpx.AsyncHTTPTransport(retries=3))}


async def _create(name: str, parameters: dict[str, Any]) -> FlowRun:
    async with get_client(httpx_settings=busy_retry_settings()) as client:
        return await arun_deployment(
            name, client=client, parameters=parameters, timeout=0, as_subflow=True
        )


def create_subflow(name: str, parameters: dict[str, Any]) -> FlowRun:
    """Create a run of deployment ``name`` as a subflow of the current flow (or task) run;
    returns it at once (scheduled)."""
    run = run_coro_as_sync(_create(name, parameters))
    assert run is not None
    return run


def wait_for_run(run_id: UUID, timeout: float | None) -> FlowRun:
    """The run once it is final (Prefect's :func:`~prefect.flow_runs.wait_for_flow_run`,
    which follows the run's state events); ``TimeoutError`` after ``timeout`` seconds."""
    try:
        run = run_coro_as_sync(wait_for_flow_run(run_id, timeout=timeout))  # type: ignore[arg-type]
    except FlowRunWaitTimeout as exc:
        raise TimeoutError(str(exc)) from None
    assert run is not None
    return run


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


# ------------------------------------------------------------------ the repartition handoff


@dataclass(frozen=True)
class Handoff:
    """The ``repartition/vit`` run a ``convert`` run created when it began."""

    deployment: str
    run_id: UUID
    location: str  # the partition's folder under the scratch prefix
    started: float


def start_repartition(
    source: str,
    checkpoint: str,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    scratch_url: str | None,
    source_read: str = "in-place",
) -> Handoff:
    """Create the repartition deployment's run (in ``gpu-pool``) before the caller lists its
    source: its worker pickup and process start (~2.5 s) overlap the listing and the
    destination check. It lists the source itself; the partition it leaves names the digest
    it read, which must equal the caller's (:func:`tasks.convert.require_same_source`). Its
    folder is keyed by the calling flow run: a retry of that run finds the partition again."""
    name = settings.repartition_deployment()
    run_id = runtime.flow_run.id or uuid.uuid4().hex  # outside a flow run: its own folder
    location = keyed_folder(
        settings.scratch_url(scratch_url),
        "handoff",
        [str(run_id), target_tp, target_pp, str(precision)],
    )
    parameters = {
        "source": source,
        "checkpoint": checkpoint or "last",
        "target_tp": target_tp,
        "target_pp": target_pp,
        "precision": precision,
        "output_url": location,
        "source_read": source_read,
    }
    run = create_subflow(name, parameters)
    return Handoff(name, run.id, location, time.perf_counter())


def finish_repartition(handoff: Handoff) -> RemoteRun:
    """Wait for the repartition run; an error unless it completed."""
    child = wait_for_run(handoff.run_id, settings.repartition_timeout())
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "without a state"
        raise RuntimeError(f"repartition run {child.name} ({child.id}) ended {state}")
    seconds = time.perf_counter() - handoff.started
    return RemoteRun(handoff.deployment, str(child.id), child.name, child.work_pool_name, seconds)


def abandon_repartition(handoff: Handoff) -> None:
    """The calling run failed: cancel its repartition run if that is not over."""
    try:
        was = stop_run(handoff.run_id)
    except Exception as e:  # noqa: BLE001 - never hide the run's own error
        get_run_logger().warning("could not cancel repartition run %s: %s", handoff.run_id, e)
        return
    if was is not None:
        get_run_logger().info("cancelled repartition run %s (%s)", handoff.run_id, was)


@contextlib.contextmanager
def handed_off(start: Callable[[], Handoff | None]) -> Iterator[Handoff | None]:
    """The handoff ``start`` creates (if any), cancelled if the block fails."""
    handoff = start()
    try:
        yield handoff
    except BaseException:
        if handoff is not None:
            abandon_repartition(handoff)
        raise
