"""Destinations: check before the work, upload the ``.nemo`` and its lineage after it.

Commit protocol: the ``.nemo`` is written first (S3: one PUT or a multipart upload that only
becomes visible when complete; local: a temporary name renamed into place), then the sidecar
``<destination>.lineage.json``. The sidecar marks the upload as committed: a ``.nemo`` without
one is a leftover of an interrupted run and is removed when the upload task finally fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.context import AssetContext
from prefect.logging import get_logger, get_run_logger
from prefect.tasks import MaterializingTask

from ckptcore import lineage
from ckptcore.api import (
    ArchiveTarget,
    FetchedCheckpoint,
    abort_incomplete_uploads,
    commit_archive,
    composite_crc32,
    get_fs,
    is_local,
    local_path,
    put_file,
)
from ckptcore.api import check_destination as check_output
from ckptcore.errors import CkptError
from tasks import settings
from tasks.convert import Packaged, Verified
from tasks.leases import release
from tasks.lineage import finish_lineage
from tasks.progress import Progress
from tasks.retry import storage_retries
from tasks.stream import take_pending

_ASSET_FORBIDDEN = set("\n\r\t\0 #?&%\"'<>[]{}|\\^`")
_MAX_ASSET_KEY = 512


# ------------------------------------------------------------------------------ helpers


def asset_key(url: str) -> str:
    """A Prefect asset key for a URL: ``s3://...`` as is, local paths as ``file://``."""
    key = f"file://{os.path.abspath(local_path(url))}" if is_local(url) else url
    key = "".join("_" if c in _ASSET_FORBIDDEN else c for c in key)
    if len(key) > _MAX_ASSET_KEY:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        key = key[: _MAX_ASSET_KEY - 17] + "-" + digest
    return key


def _exists(url: str) -> bool:
    fs, path = get_fs(url)
    return bool(fs.exists(path))


def _remove(url: str) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm_file(path)


def put_atomically(
    local: str,
    url: str,
    metadata: dict[str, str] | None = None,
    content_type: str | None = None,
    progress: Progress | None = None,
) -> None:
    """:func:`ckptcore.api.put_file` with this worker's part size and concurrency, progress
    on the run page."""
    progress = progress or Progress(f"upload {url}", 0)
    put_file(
        local,
        url,
        metadata=metadata,
        content_type=content_type,
        part_bytes=settings.upload_chunk_bytes(),
        concurrency=settings.upload_concurrency(),
        on_bytes=progress.advance,
    )


def write_sidecar(record: lineage.LineageRecord) -> str:
    """Write ``<destination>.lineage.json`` (atomically); returns its URL."""
    url = lineage.sidecar_url(record.destination)
    with tempfile.TemporaryDirectory(prefix="ckpt-sidecar-") as tmp:
        path = os.path.join(tmp, lineage.MEMBER_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(record.to_json())
        put_atomically(path, url, content_type="application/json")
    return url


def read_lineage(destination: str) -> lineage.LineageRecord | None:
    """The committed lineage record of ``destination``, or None if there is none."""
    url = lineage.sidecar_url(destination)
    fs, path = get_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return lineage.LineageRecord.from_json(f.read(), url)
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------------------ tasks


@task(
    name="check-destination",
    **storage_retries(),
)
def check_destination(destination: str, source: str, overwrite: bool = False) -> str:
    """Fail early when the destination exists (unless ``overwrite``) or is the source; abort
    the incomplete multipart uploads a killed run left for it (this run holds the
    destination's slot: no live run is writing it)."""
    if not destination.endswith(".nemo"):
        raise CkptError(destination, "the destination must be a .nemo file URL")
    check_output(destination, [source], overwrite)
    sidecar = lineage.sidecar_url(destination)
    if not overwrite and _exists(sidecar):
        raise CkptError(destination, f"already converted: {sidecar} exists (pass overwrite)")
    for url in (destination, sidecar):
        aborted = abort_incomplete_uploads(url)
        if aborted:
            get_run_logger().info(
                "aborted %d incomplete upload(s) an earlier run left for %s", len(aborted), url
            )
    return destination


@dataclass(frozen=True)
class Uploaded:
    """The committed ``.nemo`` and its final lineage record."""

    url: str
    sidecar: str
    record: lineage.LineageRecord
    seconds: float


def _committed(record: lineage.LineageRecord, seconds: float) -> Uploaded:
    """The ``.nemo`` is in place: write the sidecar (the commit mark), tell the asset."""
    final = record.with_timing("upload", seconds)
    sidecar = write_sidecar(final)
    ctx = AssetContext.get()
    key = asset_key(record.destination)
    if ctx is not None and key in {a.key for a in ctx.downstream_assets}:
        add_asset_metadata(key, final.summary())
    return Uploaded(record.destination, sidecar, final, seconds)


def _upload(packaged_path: str, record: lineage.LineageRecord) -> Uploaded:
    start = time.perf_counter()
    destination = record.destination
    _remove(lineage.sidecar_url(destination))  # an overwritten .nemo is uncommitted until the end
    size = os.path.getsize(packaged_path)
    progress = Progress(f"upload {destination}", size)
    put_atomically(packaged_path, destination, metadata=record.object_metadata(), progress=progress)
    progress.finish()
    return _committed(record, time.perf_counter() - start)


@materialize(
    "ckpt://nemo",  # replaced per destination by upload_task()
    name="upload",
    **storage_retries(),
)
def upload_nemo(packaged_path: str, record: lineage.LineageRecord) -> Uploaded:
    """Upload the ``.nemo`` with the lineage summary as object metadata, then the sidecar."""
    return _upload(packaged_path, record)


@materialize(
    "ckpt://nemo",  # replaced per destination by upload_task()
    name="upload",
    **storage_retries(),
)
def commit_nemo(pending: str | None, packaged_path: str, record: lineage.LineageRecord) -> Uploaded:
    """Complete the upload ``write-nemo`` started (its last parts may still be on their way),
    then the sidecar. Where that upload is gone or failed (a retry), send the local file again."""
    start = time.perf_counter()
    upload = take_pending(pending)
    if upload is None:
        return _upload(packaged_path, _with_output(record, packaged_path))
    _remove(lineage.sidecar_url(record.destination))
    with ThreadPoolExecutor(1, thread_name_prefix="ckpt-sha256") as pool:
        # write-nemo left the digest for now: taken while the store completes the upload
        digest = pool.submit(_with_output, record, packaged_path)
        try:
            upload.commit()
        except BaseException:
            upload.abort()
            raise
        record = digest.result()
    record = record.with_timing("commit", time.perf_counter() - start)
    return _committed(record, upload.upload_seconds or 0.0)


@materialize(
    "ckpt://nemo",  # replaced per destination by upload_task()
    name="upload",
    **storage_retries(),
)
def commit_assembled(
    target: ArchiveTarget, parts: tuple[dict, ...], record: lineage.LineageRecord
) -> Uploaded:
    """Commit the archive the workers assembled (complete its upload, or rename its work file
    into place), then the sidecar."""
    start = time.perf_counter()
    _remove(lineage.sidecar_url(record.destination))
    commit_archive(target, list(parts))
    return _committed(record, time.perf_counter() - start)


def _with_output(record: lineage.LineageRecord, packaged_path: str) -> lineage.LineageRecord:
    """``record`` with its output (size, sha256 of the local ``.nemo``) if it lacks one."""
    if record.output is not None:
        return record
    size = os.path.getsize(packaged_path)
    output = lineage.OutputInfo(record.destination, size, lineage.sha256_file(packaged_path))
    return record.with_output(output)


def _remove_uncommitted(destination: str) -> Callable[..., None]:
    def hook(task: Any, task_run: Any, state: Any) -> None:
        if not _exists(lineage.sidecar_url(destination)) and _exists(destination):
            _remove(destination)
            get_run_logger().warning("removed uncommitted %s", destination)

    hook.__name__ = "remove_uncommitted_upload"
    return hook


UPLOADS = {"upload": upload_nemo, "streamed": commit_nemo, "assembled": commit_assembled}


def upload_task(destination: str, source: str, kind: str = "upload") -> MaterializingTask:
    """The ``upload`` task of a built ``.nemo`` (``kind``: ``upload`` a local file, commit a
    ``streamed`` upload, or an ``assembled`` archive) materialising ``destination`` as an asset
    derived from ``source``."""
    return UPLOADS[kind].with_options(
        assets=[
            Asset(
                key=asset_key(destination),
                properties=AssetProperties(
                    name=destination.rsplit("/", 1)[-1],
                    description="NeMo ViT checkpoint (.nemo) converted by ckpt-pipeline; "
                    f"lineage in {lineage.sidecar_url(destination).rsplit('/', 1)[-1]}",
                ),
            )
        ],
        asset_deps=[asset_key(source)],
        on_failure=[_remove_uncommitted(destination)],
    )


@dataclass(frozen=True)
class Built:
    """A ``.nemo`` in the work folder, ready for verify and upload: the source as read, the
    archive, its lineage record as archived, the work files to remove at the end (and shared
    folders outside the work folder they may sit in); ``streamed``: ``write-nemo`` wrote it
    while its upload (``pending``) followed; ``archive``: the workers assembled it in place
    (``parts`` to complete its upload with), checked where they wrote it (``verified``)."""

    fetched: FetchedCheckpoint
    packaged: Packaged
    record: lineage.LineageRecord
    work_files: list[str]
    pending: str | None = None
    streamed: bool = False
    shared_roots: tuple[str, ...] = ()
    archive: ArchiveTarget | None = None
    parts: tuple[dict, ...] = ()
    verified: Verified | None = None


def publish(built: Built, verified: Verified | None) -> Uploaded:
    """The record completed with the output and the verify result, then ``upload``: the
    ``.nemo`` (or the commit of its streamed upload), its sidecar and asset."""
    if built.archive is not None:
        final = finish_lineage(built.record, built.packaged, verified, streamed=True)
        final = final.with_timing("assemble", built.packaged.seconds)
        if final.output is None:  # assembled in the store: S3's checksum of its parts
            crc = composite_crc32(list(built.parts))
            size = built.packaged.size_bytes
            final = final.with_output(lineage.OutputInfo(final.destination, size, None, crc))
        upload = upload_task(final.destination, final.source, "assembled")
        return upload(built.archive, built.parts, final)
    final = finish_lineage(built.record, built.packaged, verified, streamed=built.streamed)
    upload = upload_task(
        final.destination, final.source, "streamed" if built.streamed else "upload"
    )
    if built.streamed:
        return upload(built.pending, built.packaged.path, final)
    return upload(built.packaged.path, final)


@task(name="report-lineage")
def report_lineage(record: lineage.LineageRecord) -> None:
    """The lineage as a markdown page and a table of source files on the run's artifacts."""
    slug = "".join(c if c.isalnum() else "-" for c in record.destination.rsplit("/", 1)[-1].lower())
    slug = "-".join(p for p in slug.split("-") if p)[:60].strip("-") or "nemo"
    create_markdown_artifact(
        record.to_markdown(),
        key=f"lineage-{slug}",
        description=f"Lineage of {record.destination}",
    )
    create_table_artifact(
        [{"file": f.url, "bytes": f.size_bytes, "sha256": f.sha256} for f in record.source_files],
        key=f"source-files-{slug}",
        description=f"Source files of {record.destination}",
    )
    get_run_logger().info("lineage: %s", json.dumps(record.summary(), sort_keys=True))


@task(name="clean-work")
def clean_work(work_dir: str, urls: list[str], shared_roots: Sequence[str] = ()) -> list[str]:
    """Remove this run's work files (local ones only under ``work_dir`` or ``shared_roots``);
    returns what went.

    A local work folder another live run holds (:mod:`tasks.leases`: runs over identical
    sources share content-named folders) is left to that run.

    ``CKPT_KEEP_WORK=1`` keeps them (to inspect a run, or to reuse caches across runs).
    """
    if settings.current().keep_work:
        return []
    removed: list[str] = []
    kept: list[str] = []
    roots = [os.path.abspath(r) + os.sep for r in (work_dir, *shared_roots) if is_local(r)]
    for url in urls:
        if is_local(url):
            path = os.path.abspath(local_path(url))
            if not path.startswith(tuple(roots)):
                continue
            existed = os.path.exists(path)
            if not release(path):  # another live run still uses it: that run removes it
                kept.append(path)
                continue
            if not existed:
                continue
        else:
            fs, path = get_fs(url)
            if not fs.exists(path):
                continue
            fs.rm(path, recursive=True)
        removed.append(url)
    if kept:
        get_logger("ckpt.clean-work").info("kept for other runs still using them: %s", kept)
    return removed
