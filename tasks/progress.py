"""Progress of long steps as a Prefect progress artifact (a no-op outside a run)."""

from __future__ import annotations

import threading
import time
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger


class Progress:
    """Counts bytes done out of ``total`` and shows the percentage on the run page.

    Updates are throttled to one per ``interval`` seconds; :meth:`advance` is thread-safe.
    Called outside a flow or task run (``task.fn(...)`` in tests), it only counts.
    """

    def __init__(self, what: str, total: int, interval: float = 1.0) -> None:
        self.what = what
        self.total = max(int(total), 0)
        self.done = 0
        self.interval = interval
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._artifact: UUID | None = None
        self._in_run = TaskRunContext.get() is not None or FlowRunContext.get() is not None
        if self._in_run and self.total:
            self._artifact = create_progress_artifact(0.0, description=what)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += int(nbytes)
            now = time.monotonic()
            if self._artifact is None or now - self._last < self.interval:
                return
            self._last = now
            pct = self.percent
        update_progress_artifact(self._artifact, pct)

    @property
    def percent(self) -> float:
        return 100.0 if not self.total else min(100.0, 100.0 * self.done / self.total)

    def tensor(self, key: str, nbytes: int) -> None:
        """``ckptcore`` engine callback: one tensor of ``nbytes`` was written."""
        self.advance(nbytes)

    def finish(self) -> None:
        if self._artifact is not None:
            update_progress_artifact(self._artifact, 100.0)
        if self._in_run:
            get_run_logger().info("%s: %s bytes done", self.what, f"{self.done:,}")
