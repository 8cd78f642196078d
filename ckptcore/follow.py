"""Readers that follow a local file while another thread writes it.

A writer calls ``written(position)`` as the file grows and ``finish(size)`` at its end
(:func:`ckptcore.api.write_nemo_file` does both); a follower reads each byte once, behind the
writer, from the page cache. :class:`FollowingDigest` is the sha256 of the file, ready as soon
as writing ends; :class:`ckptcore.multipart.FollowingUpload` sends it to S3.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Protocol

BLOCK = 8 << 20


class Follower(Protocol):
    def written(self, position: int) -> None: ...

    def finish(self, size: int) -> None: ...


class FollowsWriter:
    """A :class:`Follower`'s side of the writer: how far the file is written and, once writing
    ended, its length (``_written``, ``_size``, guarded by ``_cond``, which the follower's own
    thread waits on)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._written = 0
        self._size: int | None = None  # set by finish()

    def written(self, position: int) -> None:
        """The file holds its bytes up to ``position`` (a writer's running total)."""
        with self._cond:
            if position > self._written:
                self._written = position
                self._cond.notify_all()

    def finish(self, size: int) -> None:
        """Writing is over: the file is ``size`` bytes long."""
        with self._cond:
            self._written = self._size = size
            self._cond.notify_all()


class FollowingDigest(FollowsWriter):
    """The sha256 of ``path``, read on a helper thread as the writer goes."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._cancelled = False
        self._error: BaseException | None = None
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="ckpt-digest", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as f:
                done = 0
                while True:
                    with self._cond:
                        while (
                            not self._cancelled
                            and self._written - done < BLOCK
                            and self._size is None
                        ):
                            self._cond.wait()
                        if self._cancelled:
                            return
                        end, size = self._written, self._size
                    while done < end:
                        chunk = os.pread(f.fileno(), min(BLOCK, end - done), done)
                        if not chunk:
                            raise OSError(f"{self.path} ends at {done}, before {end}")
                        self._hash.update(chunk)
                        done += len(chunk)
                    if size is not None and done >= size:
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to hexdigest()
            self._error = exc

    def hexdigest(self) -> str:
        """The file's sha256 (after ``finish``); waits for the reader to catch up."""
        if self._size is None:
            raise RuntimeError("digest asked for before the file was finished")
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()
