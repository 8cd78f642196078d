"""Pipeline settings, read from the environment (never credentials: s3fs reads ``AWS_*`` itself).

| variable | default | meaning |
|---|---|---|
| ``CKPT_WORK_DIR`` | ``$TMPDIR/ckpt-work`` | local work folder: fetched sources, rank files, packages |
| ``CKPT_SCRATCH_URL`` | unset | object-storage prefix for files handed between deployments |
| ``CKPT_REPARTITION`` | ``auto`` | ``auto``: a deployed run hands repartitioning to the ``repartition/vit`` deployment, a local run does it in-process; ``inline`` / ``deployment`` force one |
| ``CKPT_REPARTITION_DEPLOYMENT`` | ``repartition/vit`` | the deployment that repartitions |
| ``CKPT_REPARTITION_TIMEOUT`` | unset (wait) | seconds to wait for it |
| ``CKPT_POLL_SECONDS`` | ``0.5`` | how often a parent polls a child run (at least 0.2; each poll is one API read) |
| ``CKPT_RETRIES`` | ``3`` | retries of storage tasks (transient errors only) |
| ``CKPT_RETRY_BACKOFF`` | ``2`` | first retry delay in seconds, doubled each time (``0`` in tests) |
| ``CKPT_UPLOAD_CHUNK_BYTES`` | ``67108864`` | multipart part size for S3 uploads (S3 needs >= 5 MiB) |
| ``CKPT_VERIFY_IMAGES`` | ``1`` | images the verify step runs through source and output (each costs one forward pass of each model; one image already uses every weight, so a wrong one shows) |
| ``CKPT_VERIFY_PROCESS`` | ``auto`` | ``warm``: a run that verifies starts a child process when it begins, which imports torch and the reference model (~2 s) while the run lists, opens and converts, then verifies there; ``inline``: verify in the flow's process; ``auto``: ``warm`` unless torch is already imported in the flow's process (a warm process that ran flows before: nothing left to gain) |
| ``CKPT_UPLOAD`` | ``stream`` | how ``convert`` (repartitioning in-process) uploads to ``s3://``: ``stream`` writes the ``.nemo`` once, locally, while a multipart upload follows the file, completed only once verify passed (aborted otherwise); the object's metadata then lacks the output's sha256 and the verify result (the sidecar has them). ``after``: package, verify, then upload with the full metadata |
| ``CKPT_READ_CONCURRENCY`` | ``4`` | ranged GETs in flight per source object while reading a remote source in place (read by ckptcore; each holds up to 64 MiB, within a 256 MiB read-ahead per object) |
| ``CKPT_UPLOAD_CHECKSUM`` | ``crc32`` | S3 additional checksum of the streamed ``.nemo`` upload: ``crc32`` sends each part's CRC-32 (the store checks it and keeps the object's composite checksum), ``none`` only ETags (for S3-compatible stores without additional checksums) |
| ``CKPT_UPLOAD_CONCURRENCY`` | ``4`` | parts of one S3 upload sent at the same time (each holds a part in memory) |
| ``CKPT_RUNNER`` | unset (one process) | map the repartition step over the plan's work items (one task per target rank file) on a task runner: ``threads[:N]``, ``dask`` (a ``LocalCluster``), ``dask://host:8786`` (an existing scheduler; also ``tcp://``/``tls://``), ``ray``, ``ray://host:10001``; ``inline`` forces the one-process path. The ``runner`` flow parameter wins over it |
| ``CKPT_RUNNER_WORKERS`` | unset: CPU count (threads), Dask's default (``LocalCluster``) | threads of ``threads``, worker processes of a ``dask`` ``LocalCluster`` |
| ``CKPT_SOURCE_READ`` | ``in-place`` | how a remote source is read: ``in-place`` (ranged reads of only the records the conversion needs, kept in a local range cache for verify) or ``download`` (fetch every file first, with its sha256 in the lineage) |
| ``CKPT_STAGING_URL`` | ``CKPT_SCRATCH_URL``, else the work folder | where mapped items write their rank files: object storage, or a folder every worker shares |

Retry settings are read when ``tasks`` is imported (Prefect fixes them on the decorator);
the others on each call.
"""

from __future__ import annotations

import os
import tempfile

from ckptcore.errors import CkptError

MIN_PART_BYTES = 5 << 20


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise CkptError(None, f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise CkptError(None, f"{name}={raw!r} must be >= 0")
    return value


def work_dir() -> str:
    """The local work folder (created on demand)."""
    path = os.environ.get("CKPT_WORK_DIR") or os.path.join(tempfile.gettempdir(), "ckpt-work")
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    return path


def scratch_url(explicit: str | None = None) -> str:
    """The scratch prefix: the flow parameter if given, else ``CKPT_SCRATCH_URL``."""
    url = explicit or os.environ.get("CKPT_SCRATCH_URL", "").strip()
    if not url:
        raise CkptError(
            None,
            "no scratch location: set CKPT_SCRATCH_URL (e.g. s3://ckpt-scratch/pipeline) "
            "or pass scratch_url, so the repartition deployment can hand its files back",
        )
    return url.rstrip("/")


def source_read() -> str:
    """``in-place`` (default) or ``download``: see ``CKPT_SOURCE_READ``."""
    mode = os.environ.get("CKPT_SOURCE_READ", "in-place").strip() or "in-place"
    if mode not in ("in-place", "download"):
        raise CkptError(None, f"CKPT_SOURCE_READ={mode!r}: expected in-place or download")
    return mode


def repartition_mode() -> str:
    mode = os.environ.get("CKPT_REPARTITION", "auto").strip() or "auto"
    if mode not in ("auto", "inline", "deployment"):
        raise CkptError(None, f"CKPT_REPARTITION={mode!r}: expected auto, inline or deployment")
    return mode


def repartition_deployment() -> str:
    return os.environ.get("CKPT_REPARTITION_DEPLOYMENT", "repartition/vit").strip()


def repartition_timeout() -> float | None:
    value = _float("CKPT_REPARTITION_TIMEOUT", 0.0)
    return value or None


def poll_seconds() -> float:
    return max(_float("CKPT_POLL_SECONDS", 0.5), 0.2)


def retries() -> int:
    return int(_float("CKPT_RETRIES", 3))


def retry_backoff() -> float:
    return _float("CKPT_RETRY_BACKOFF", 2.0)


def retry_delays() -> list[float]:
    """Delays before each retry: ``backoff * 2**i`` (Prefect adds jitter)."""
    base = retry_backoff()
    return [base * 2**i for i in range(retries())]


def upload_chunk_bytes() -> int:
    value = int(_float("CKPT_UPLOAD_CHUNK_BYTES", 64 << 20))
    if value < MIN_PART_BYTES:
        raise CkptError(None, f"CKPT_UPLOAD_CHUNK_BYTES={value}: S3 parts must be >= 5 MiB")
    return value


def verify_images() -> int:
    value = int(_float("CKPT_VERIFY_IMAGES", 1))
    if value < 1:
        raise CkptError(None, f"CKPT_VERIFY_IMAGES={value}: must be at least 1")
    return value


def verify_process() -> str:
    """``auto`` (default), ``warm`` or ``inline``: see ``CKPT_VERIFY_PROCESS``."""
    mode = os.environ.get("CKPT_VERIFY_PROCESS", "auto").strip() or "auto"
    if mode not in ("auto", "warm", "inline"):
        raise CkptError(None, f"CKPT_VERIFY_PROCESS={mode!r}: expected auto, warm or inline")
    return mode


def upload_mode() -> str:
    """``stream`` (default) or ``after``: see ``CKPT_UPLOAD``."""
    mode = os.environ.get("CKPT_UPLOAD", "stream").strip() or "stream"
    if mode not in ("stream", "after"):
        raise CkptError(None, f"CKPT_UPLOAD={mode!r}: expected stream or after")
    return mode


def upload_checksum() -> str | None:
    """``CRC32`` (default) or None: see ``CKPT_UPLOAD_CHECKSUM``."""
    raw = os.environ.get("CKPT_UPLOAD_CHECKSUM", "crc32").strip().lower() or "crc32"
    if raw not in ("crc32", "none"):
        raise CkptError(None, f"CKPT_UPLOAD_CHECKSUM={raw!r}: expected crc32 or none")
    return None if raw == "none" else "CRC32"


def upload_concurrency() -> int:
    value = int(_float("CKPT_UPLOAD_CONCURRENCY", 4))
    if value < 1:
        raise CkptError(None, f"CKPT_UPLOAD_CONCURRENCY={value}: must be at least 1")
    return value


RUNNER_KINDS = ("threads", "dask", "ray")


def runner(explicit: str | None = None) -> str | None:
    """The task runner of the mapped mode (see ``CKPT_RUNNER``); None: the one-process path.

    The flow parameter wins over the environment; ``inline`` (either) means one process.
    """
    raw = ((explicit or "").strip() or os.environ.get("CKPT_RUNNER", "")).strip()
    if not raw or raw in ("inline", "none"):
        return None
    kind = raw.split(":", 1)[0]
    if kind not in RUNNER_KINDS + ("tcp", "tls") or (
        kind == "threads" and raw != kind and not raw[8:].isdigit()
    ):
        raise CkptError(
            None,
            f"runner {raw!r}: expected threads[:N], dask, dask://host:port, ray, ray://host:port "
            "or inline",
        )
    return raw


def runner_workers() -> int | None:
    """Workers of a ``LocalCluster`` / threads of the thread runner; None: the runner decides."""
    value = int(_float("CKPT_RUNNER_WORKERS", 0))
    return value or None


def staging_url(explicit_scratch: str | None = None) -> str:
    """Where mapped items write rank files: ``CKPT_STAGING_URL``, else the scratch prefix (the
    ``scratch_url`` parameter or ``CKPT_SCRATCH_URL``), else the local work folder."""
    url = os.environ.get("CKPT_STAGING_URL", "").strip()
    url = url or explicit_scratch or os.environ.get("CKPT_SCRATCH_URL", "").strip()
    return url.rstrip("/") if url else work_dir()
