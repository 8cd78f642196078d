"""The pipeline's settings: how a worker is set up, typed, read from ``CKPT_*`` variables.

These describe the machine a flow runs on (where its work folder is, how it talks to S3), never
which path a run takes: that is chosen by flow parameters (``convert/vit``'s ``repartition``,
``upload``, ``source_read``, ``verify_process``, ``runner``), visible in ``prefect.yaml`` and the
UI. Credentials and endpoints are not settings: s3fs reads ``AWS_*`` itself.

A flow run loads them once when it begins (:func:`pinned`), every step of the run reads that
same value (:func:`current`), and the lineage record keeps it (:meth:`PipelineSettings.recorded`).
Outside a run, :func:`current` reads the environment at each call. ``python -m tasks.settings``
lists them with the values in force; ckptcore's own settings (``CKPT_READ_CONCURRENCY``,
``SOURCE_DATE_EPOCH``) are read by :mod:`ckptcore.settings` and listed by ``ckpt --help``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ckptcore import settings as core_settings
from ckptcore.errors import CkptError

MIN_PART_BYTES = 5 << 20
PREFIX = "CKPT_"


class PipelineSettings(BaseSettings):
    """One worker's setup; each field is the variable ``CKPT_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="ignore", frozen=True, env_ignore_empty=True
    )

    work_dir: str = Field(
        "", description="local work folder: range caches, rank files, packages ($TMPDIR/ckpt-work)"
    )
    scratch_url: str = Field(
        "", description="object-storage prefix for files handed between deployments"
    )
    staging_url: str = Field(
        "",
        description="where mapped items write rank files (default: the scratch prefix, else the "
        "work folder): object storage, or a folder every worker shares",
    )
    repartition_deployment: str = Field(
        "repartition/vit", description="the deployment a `repartition=deployment` run hands to"
    )
    repartition_timeout: float = Field(
        0.0, ge=0, description="seconds to wait for that run (0: as long as it takes)"
    )
    retries: int = Field(3, ge=0, description="retries of storage tasks (transient errors only)")
    retry_backoff: float = Field(
        2.0, ge=0, description="first retry delay in seconds, doubled each time"
    )
    upload_chunk_bytes: int = Field(
        64 << 20, ge=MIN_PART_BYTES, description="S3 multipart part size (S3 needs >= 5 MiB)"
    )
    min_part_bytes: int = Field(
        MIN_PART_BYTES,
        ge=1,
        description="the store's smallest multipart part but the last (S3: 5 MiB): pieces "
        "workers write into the final archive are at least this long",
    )
    upload_concurrency: int = Field(
        4, ge=1, description="parts of one S3 upload in flight (each held in memory)"
    )
    upload_checksum: Literal["crc32", "none"] = Field(
        "crc32",
        description="additional checksum of streamed uploads: crc32, or none for stores "
        "without additional checksums",
    )
    verify_images: int = Field(
        1, ge=1, description="images verify runs through source and output (one uses every weight)"
    )
    destination_wait: float = Field(
        0.0,
        ge=0,
        description="seconds a run waits for another run writing its destination (0: no limit)",
    )
    destination_lease_seconds: float = Field(
        60.0,
        ge=60,
        description="a run renews its hold on its destination this often; a killed run's "
        "hold lapses after it (Prefect's minimum: 60)",
    )
    keep_work: bool = Field(
        False, description="keep a run's work files (to inspect a run, or reuse caches)"
    )
    runner_workers: int = Field(
        0, ge=0, description="threads of `threads`, processes of a `dask` LocalCluster (0: auto)"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _trimmed(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("upload_checksum", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def work_folder(self) -> str:
        """The local work folder, absolute (created on demand)."""
        path = self.work_dir or os.path.join(tempfile.gettempdir(), "ckpt-work")
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        return path

    def recorded(self) -> dict[str, Any]:
        """What the lineage keeps: these settings and ckptcore's, as they were for the run."""
        core = core_settings.current()
        return {
            **self.model_dump(),
            "read_concurrency": core.read_concurrency,
            "source_date_epoch": core.source_date_epoch,
        }


_ERRORS = {
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "literal_error": lambda e: f"expected {e['ctx']['expected']}",
    "bool_parsing": lambda e: "expected true or false (1 or 0)",
}


def load() -> PipelineSettings:
    """The settings the environment gives now; a bad value is a one-line ``CkptError``
    naming the variable."""
    try:
        return PipelineSettings()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = PREFIX + field.upper()
        raw = os.environ.get(name, "")
        explain = _ERRORS.get(error["type"])
        if field == "upload_chunk_bytes" and error["type"] == "greater_than_equal":
            why = "S3 parts must be >= 5 MiB"
        elif explain is not None:
            why = explain(error)
        elif error["type"].endswith("_parsing"):
            why = "is not a number"
        else:
            why = str(error["msg"])
        raise CkptError(None, f"{name}={raw!r}: {why}") from None


_PINNED: ContextVar[PipelineSettings | None] = ContextVar("ckpt_pipeline_settings", default=None)


def current() -> PipelineSettings:
    """The settings of the run in progress (:func:`pinned`), else the environment's now."""
    return _PINNED.get() or load()


@contextlib.contextmanager
def pinned() -> Iterator[PipelineSettings]:
    """Load the settings once for a run: within the block (and the tasks it starts),
    :func:`current` answers these values. Nested, the outer run's stay."""
    outer = _PINNED.get()
    if outer is not None:
        yield outer
        return
    token = _PINNED.set(load())
    try:
        yield _PINNED.get()  # type: ignore[misc]
    finally:
        _PINNED.reset(token)


# The values as the steps read them.


def work_dir() -> str:
    """The local work folder (created on demand)."""
    return current().work_folder()


def scratch_url(explicit: str | None = None) -> str:
    """The scratch prefix: the flow parameter if given, else ``CKPT_SCRATCH_URL``."""
    url = (explicit or current().scratch_url).strip()
    if not url:
        raise CkptError(
            None,
            "no scratch location: set CKPT_SCRATCH_URL (e.g. s3://ckpt-scratch/pipeline) "
            "or pass scratch_url, so the repartition deployment can hand its files back",
        )
    return url.rstrip("/")


def staging_url(explicit_scratch: str | None = None) -> str:
    """Where mapped items write rank files: ``CKPT_STAGING_URL``, else the scratch prefix (the
    ``scratch_url`` parameter or ``CKPT_SCRATCH_URL``), else the local work folder."""
    s = current()
    url = (s.staging_url or explicit_scratch or s.scratch_url).strip()
    return url.rstrip("/") if url else s.work_folder()


def repartition_deployment() -> str:
    return current().repartition_deployment.strip()


def repartition_timeout() -> float | None:
    return current().repartition_timeout or None


def retry_delays() -> list[float]:
    """Delays before each retry: ``backoff * 2**i`` (Prefect adds jitter)."""
    s = current()
    return [s.retry_backoff * 2**i for i in range(s.retries)]


def retries() -> int:
    return current().retries


def upload_chunk_bytes() -> int:
    return current().upload_chunk_bytes


def min_part_bytes() -> int:
    return current().min_part_bytes


def upload_concurrency() -> int:
    return current().upload_concurrency


def upload_checksum() -> str | None:
    """``CRC32`` (the S3 name) or None."""
    return None if current().upload_checksum == "none" else "CRC32"


def verify_images() -> int:
    return current().verify_images


def runner_workers() -> int | None:
    """Workers of a ``LocalCluster`` / threads of the thread runner; None: the runner decides."""
    return current().runner_workers or None


def describe(values: PipelineSettings | None = None) -> str:
    """The settings as a table: variable, value in force (or default), meaning."""
    values = values or load()
    rows = [
        (PREFIX + name.upper(), repr(getattr(values, name)), field.description or "")
        for name, field in PipelineSettings.model_fields.items()
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{n:<{width}}  {v:<12}  {m}" for n, v, m in rows)


if __name__ == "__main__":
    try:
        print(describe())
    except CkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
