"""The one error type of ckptcore: a user-facing problem with a file, a key, or a parameter."""

from __future__ import annotations

import errno


class CkptError(Exception):
    """A problem with the user's input, reported as one line: ``<path>: <key>: <problem>``.

    Anything else raised from ckptcore is a bug and keeps its traceback.
    """

    def __init__(self, path: str | None, problem: str, key: str | None = None) -> None:
        self.path = path
        self.problem = problem
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.path, self.key) if p]
        parts.append(self.problem)
        return ": ".join(parts)

    def __reduce__(self):  # picklable across process pools
        return (CkptError, (self.path, self.problem, self.key))


class MachineError(CkptError):
    """The machine failed a correct request: the disk is full, a file grew past its limit, an
    I/O error. One line like any :class:`CkptError` (the ``ckpt`` command exits 74 for it)."""

    def __reduce__(self):
        return (MachineError, (self.path, self.problem, self.key))


# errno values that say the machine failed, not the request
_MACHINE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EFBIG", "EDQUOT", "EIO", "ENOMEM", "EROFS")
    if hasattr(errno, name)
)


def write_error(path: str | None, problem: str, exc: OSError) -> CkptError:
    """The error for a failed local write: a :class:`MachineError` when the machine failed
    (full disk, file size limit, I/O error), else a :class:`CkptError` (no permission, no such
    folder: the request names a place that cannot be written)."""
    cls = MachineError if exc.errno in _MACHINE_ERRNOS else CkptError
    return cls(path, f"{problem}: {exc.strerror or exc}")


class StorageError(Exception):
    """Storage failed to answer (network drop, server error, timeout): not the input's fault.

    One line like :class:`CkptError` (``<url>: <problem>``), but deliberately *not* a
    ``CkptError``: the same call may succeed when retried. It is raised ``from`` the storage
    library's exception, so retry policies can judge that cause (``tasks.retry``).
    """

    def __init__(self, path: str | None, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(p for p in (self.path, self.problem) if p)

    def __reduce__(self):
        return (StorageError, (self.path, self.problem))


# Failures that say something about the request, not the connection: retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def describe(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one bounded line (its type name when it has none)."""
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = " ".join(str(message).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def storage_error(path: str, doing: str, exc: BaseException) -> CkptError | StorageError:
    """The error to raise (``from exc``) when storage fails while ``doing`` something to ``path``:
    a ``CkptError`` for a missing object or a refused permission, else a ``StorageError``."""
    if isinstance(exc, FileNotFoundError):
        return CkptError(path, f"{doing}: not found")
    if isinstance(exc, _PERMANENT):
        return CkptError(path, f"{doing}: {exc.strerror or describe(exc)}")
    return StorageError(path, f"{doing}: {describe(exc)}")
