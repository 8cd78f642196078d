"""Which failures are worth retrying: storage hiccups yes, user errors and bugs never."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from ckptcore import errors
from ckptcore.errors import CkptError

# OSErrors that say something about the request, not the network: retrying cannot help.
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_TRANSIENT_HTTP_CODES = {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException"}
# ckptcore's "storage failed to answer" (raised ``from`` the storage library's error), if present.
_STORAGE_ERROR: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(errors, "StorageError", None),) if isinstance(t, type)
)


def _botocore_transient(exc: BaseException) -> bool | None:
    try:
        from botocore import exceptions as bce
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return None
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0)
        return (isinstance(status, int) and status >= 500) or err.get(
            "Code"
        ) in _TRANSIENT_HTTP_CODES
    if isinstance(exc, bce.HTTPClientError | bce.ConnectionError | bce.ReadTimeoutError):
        return True
    return None


def is_transient(exc: BaseException | None) -> bool:
    """True for network and storage-server failures; False for ``CkptError`` and anything else.

    s3fs turns S3 errors into ``OSError`` subclasses (``FileNotFoundError`` for a missing key,
    ``PermissionError`` for access denied, plain ``OSError`` for server errors), so a plain
    ``OSError`` or a connection/timeout error is taken as transient; a missing file is not.
    ckptcore's ``StorageError`` is transient unless the error it was raised from is permanent.
    Other exceptions are bugs; one raised ``from`` a transient error counts as transient.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (CkptError, *_PERMANENT_OS_ERRORS)):
            return False
        if _STORAGE_ERROR and isinstance(exc, _STORAGE_ERROR):
            cause = exc.__cause__
            return cause is None or not isinstance(cause, (CkptError, *_PERMANENT_OS_ERRORS))
        if isinstance(
            exc,
            ConnectionError | TimeoutError | asyncio.TimeoutError | concurrent.futures.TimeoutError,
        ):
            return True
        verdict = _botocore_transient(exc)
        if verdict is not None:
            return verdict
        try:
            import aiohttp
        except ImportError:  # pragma: no cover
            aiohttp = None  # type: ignore[assignment]
        if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
            return True
        if type(exc) is OSError:
            return True
        exc = exc.__cause__  # explicit chaining only: an error while handling another is a bug
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure :func:`is_transient`."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the result itself could not be read: decide on that error
        exc = err
    return isinstance(exc, BaseException) and is_transient(exc)


def storage_retries() -> dict[str, Any]:
    """The retry settings of every task that talks to storage: transient failures only
    (:func:`retry_transient`), exponential backoff with jitter, counts from the environment."""
    from tasks import settings

    return {
        "retries": settings.retries(),
        "retry_delay_seconds": settings.retry_delays(),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_transient,
    }
