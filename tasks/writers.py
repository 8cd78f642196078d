"""One writer per destination: a Prefect global concurrency limit of 1 named by the destination.

From its destination check to its lineage report a run holds that limit's one slot through a
lease it renews while it lives. A second run for the same destination waits, then finds the
destination as the first left it. A killed holder's lease lapses: on the server's next pass
after ``CKPT_DESTINATION_LEASE_SECONDS`` (its repossessor service), and at once for a holder
on this machine whose process is gone (each holder leaves a record in the temporary folder;
Prefect's ephemeral API runs no repossessor, so this is what frees a killed ``make demo``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger

from ckptcore.api import process_alive
from ckptcore.errors import CkptError
from tasks import settings

LIMIT_PREFIX = "ckpt-destination-"
LOCKED = 423  # the API's answer when the limit has no free slot
POLL_SECONDS = 1.0


def writer_limit_name(destination: str) -> str:
    """The Prefect global concurrency limit of one destination (named by its URL's digest)."""
    return LIMIT_PREFIX + hashlib.sha256(destination.encode()).hexdigest()[:24]


def _record_path(name: str) -> str:
    """This machine's record of the slot's holder (a process here: its pid, its lease)."""
    folder = os.path.join(tempfile.gettempdir(), "ckpt-writers")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.json")


def _release_if_holder_gone(client, name: str) -> None:
    """A holder on this machine whose process is gone (killed): release its lease."""
    path = _record_path(name)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return
    if process_alive(int(record.get("pid", 0))):
        return
    with contextlib.suppress(httpx.HTTPStatusError, ObjectNotFound):
        client.release_concurrency_slots_with_lease(UUID(record["lease_id"]))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    get_logger("ckpt.writers").info("released the hold of a killed run (pid %s)", record["pid"])


def _try_acquire(client, name: str, lease_seconds: float) -> UUID | None:
    try:
        reply = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=lease_seconds
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == LOCKED:
            return None
        raise
    return UUID(reply.json()["lease_id"])


def _renew(lease_id: UUID, lease_seconds: float, stop: threading.Event) -> None:
    with get_client(sync_client=True) as client:
        while not stop.wait(lease_seconds / 3):
            with contextlib.suppress(Exception):  # the next try, or the lease lapses
                client.renew_concurrency_lease(lease_id, lease_seconds)


@contextlib.contextmanager
def one_writer(destination: str) -> Iterator[str]:
    """Hold the destination's slot for the block (see the module doc); after
    ``CKPT_DESTINATION_WAIT`` seconds of waiting (0: no limit) stop with a one-line error
    naming the destination and the limit. Yields the limit's name."""
    name = writer_limit_name(destination)
    config = settings.current()
    lease_seconds = config.destination_lease_seconds
    deadline = time.monotonic() + config.destination_wait if config.destination_wait else None
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        while True:
            _release_if_holder_gone(client, name)
            lease_id = _try_acquire(client, name, lease_seconds)
            if lease_id is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise CkptError(
                    destination,
                    f"another run has been writing this destination for "
                    f"{config.destination_wait:g} s (Prefect concurrency limit {name}); "
                    "nothing was done, run again once it is over",
                )
            time.sleep(POLL_SECONDS)
        record = _record_path(name)
        tmp = f"{record}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "lease_id": str(lease_id)}, f)
        os.replace(tmp, record)
        stop = threading.Event()
        renewer = threading.Thread(
            target=_renew, args=(lease_id, lease_seconds, stop), name="ckpt-writer-lease",
            daemon=True,
        )  # fmt: skip
        renewer.start()
        try:
            yield name
        finally:
            stop.set()
            renewer.join(10)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record)
            client.release_concurrency_slots_with_lease(lease_id)
