"""Repartition, package and verify: thin tasks over ``ckptcore.api``.

A repartitioned checkpoint is a *partition*: ``model_config.yaml`` plus the target rank files
in one folder (local or under the scratch prefix), committed by a ``partition.json`` manifest
written last. The ``repartition/vit`` deployment writes one; the parent flow downloads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prefect import get_run_logger, task

from ckptcore import api, lineage
from ckptcore.api import (
    FetchedCheckpoint,
    check_unchanged,
    get_fs,
    is_local,
    join,
    local_path,
    open_checkpoint,
    package_nemo,
    plan_conversion,
    process_folder,
    put_file,
    staging_folder,
    write_rank_files,
)
from ckptcore.errors import CkptError
from ckptcore.verify_process import VerifyProcess, VerifyProcessGone
from tasks import settings
from tasks.cache import ContentCache
from tasks.leases import hold
from tasks.progress import Progress
from tasks.retry import storage_retries

PARTITION_MANIFEST = "partition.json"


@dataclass(frozen=True)
class Partition:
    """Target rank files of one repartitioning, and what the plan said about them."""

    url: str  # folder (local path or object-storage prefix)
    members: dict[str, str]  # archive member -> URL
    layout: lineage.Layout
    tensor_bytes: int
    seconds: float
    source_digest: str | None = None  # of the source files as the writing run listed them

    def manifest(self) -> dict[str, Any]:
        """JSON for ``partition.json``: members relative to the folder, the layout's fields."""
        return {
            "members": {m: m for m in self.members},
            **self.layout.to_dict(),
            "tensor_bytes": self.tensor_bytes,
            "seconds": self.seconds,
            "source_digest": self.source_digest,
        }

    @classmethod
    def from_manifest(cls, url: str, data: dict[str, Any]) -> Partition:
        return cls(
            url=url,
            members={m: join(url, rel) for m, rel in data["members"].items()},
            layout=lineage.Layout.from_dict(data),
            tensor_bytes=data["tensor_bytes"],
            seconds=data["seconds"],
            source_digest=data.get("source_digest"),
        )

    def content_key(self) -> str:
        return hashlib.sha256(
            json.dumps([self.layout.plan_digest, sorted(self.members)], sort_keys=True).encode()
        ).hexdigest()


@dataclass(frozen=True)
class Packaged:
    """A ``.nemo`` in the local work folder. ``sha256`` None: not taken yet (a streamed upload
    takes it while the store completes the upload)."""

    path: str
    size_bytes: int
    sha256: str | None
    seconds: float


def partition_location(
    root: str,
    fetched: FetchedCheckpoint,
    target_tp: int | None,
    target_pp: int | None,
    precision: str | int | None,
) -> str:
    """A folder under ``root`` named by content: the same inputs always land in the same place."""
    key = [fetched.content_key(), target_tp, target_pp, str(precision)]
    return keyed_folder(root, "partition", key)


def keyed_folder(root: str, prefix: str, key: list[str | int | None]) -> str:
    """``<root>/<prefix>-<digest of key as JSON>``: the same key always names the same folder."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    return join(root, f"{prefix}-{digest}")


def _read_partition(url: str) -> Partition | None:
    fs, path = get_fs(join(url, PARTITION_MANIFEST))
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    return Partition.from_manifest(url, data)


def partition_is_present(partition: Partition) -> bool:
    """Is the partition (its manifest and members) still where its record says?"""
    fs, path = get_fs(join(partition.url, PARTITION_MANIFEST))
    if not fs.exists(path):
        return False
    return all(get_fs(url)[0].exists(get_fs(url)[1]) for url in partition.members.values())


def write_partition(
    fetched: FetchedCheckpoint,
    target_tp: int | None,
    target_pp: int | None,
    precision: str | int | None,
    output_url: str,
) -> Partition:
    """Stream the source through ckptcore's engine into ``output_url`` (manifest last)."""
    start = time.perf_counter()
    fs, manifest_path = get_fs(join(output_url, PARTITION_MANIFEST))
    if fs.exists(manifest_path):
        fs.rm_file(manifest_path)  # an older partition here is not valid while we rewrite it
    with open_checkpoint(fetched.open_url, cache=fetched.cache_dir) as ck:
        plan = plan_conversion(ck, target_tp, target_pp, precision)
        tensor_bytes = sum(f.write_bytes for f in plan.files)
        progress = Progress(f"repartition to TP={plan.target.tp} PP={plan.target.pp}", tensor_bytes)
        local_out = is_local(output_url)
        with contextlib.ExitStack() as stack:
            stage = local_path(output_url) if local_out else stack.enter_context(staging_folder())
            os.makedirs(stage, exist_ok=True)
            files = write_rank_files(ck, plan, stage, progress=progress.tensor)
            progress.finish()
            if not local_out:
                for member, path in files.items():
                    put_file(
                        path,
                        join(output_url, member),
                        part_bytes=settings.upload_chunk_bytes(),
                        concurrency=settings.upload_concurrency(),
                    )
        part = Partition(
            url=output_url,
            members={m: join(output_url, m) for m in files},
            layout=lineage.Layout.of(ck, plan),
            tensor_bytes=tensor_bytes,
            seconds=time.perf_counter() - start,
            source_digest=fetched.digest,
        )
    if fetched.in_place:
        check_unchanged(fetched)  # the bytes read all come from the objects as listed
    with fs.open(manifest_path, "wb") as f:
        f.write(json.dumps(part.manifest(), indent=2, sort_keys=True).encode())
    return part


@task(
    name="repartition",
    **storage_retries(),
    persist_result=True,
    cache_policy=ContentCache(),
)
def repartition(
    fetched: FetchedCheckpoint,
    target_tp: int | None,
    target_pp: int | None,
    precision: str | int | None,
    output_url: str,
) -> Partition:
    """open_checkpoint + plan_conversion + write_rank_files to the target TP/PP at ``output_url``.

    Cached by the fetched source's digest, the target layout and ``output_url``; call it
    through :func:`tasks.cache.run_cached` with :func:`partition_is_present`.
    """
    return write_partition(fetched, target_tp, target_pp, precision, output_url)


@task(
    name="download-partition",
    **storage_retries(),
)
def download_partition(url: str, work_dir: str) -> Partition:
    """Copy a partition that another run left under the scratch prefix into the work folder.

    The folder is named by the partition's content, so runs that convert identical bytes at the
    same time share it: this run holds it (:mod:`tasks.leases`), and each copy goes to a name of
    its own before it replaces the member."""
    remote = _read_partition(url)
    if remote is None:
        raise CkptError(url, f"no {PARTITION_MANIFEST}: the repartition run did not finish")
    folder = os.path.join(work_dir, f"download-{remote.content_key()[:24]}")
    hold(folder)
    members = {}
    for member, src in remote.members.items():
        dest = os.path.join(folder, member)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs, path = get_fs(src)
        part = f"{dest}.part-{uuid.uuid4().hex[:8]}"
        try:
            fs.get_file(path, part)
            os.replace(part, dest)
        finally:
            if os.path.exists(part):
                os.unlink(part)
        members[member] = dest
    return replace(remote, url=folder, members=members)


def require_same_source(partition: Partition, fetched: FetchedCheckpoint) -> None:
    """Fail when another run wrote ``partition`` from other source files than ``fetched``
    (the source changed between the two runs' listings, or a rerun found an older one)."""
    if partition.source_digest != fetched.digest:
        found = (partition.source_digest or "none")[:12]
        raise CkptError(
            fetched.source,
            f"source changed while it was converted: the repartition run read digest {found}, "
            f"this run listed {fetched.digest[:12]}",
        )


def package_partition(
    partition: Partition, record: lineage.LineageRecord, out_path: str
) -> Packaged:
    """``.nemo`` at ``out_path`` with the partition's files plus a ``lineage.json`` member."""
    start = time.perf_counter()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckpt-lineage-") as tmp:
        member = os.path.join(tmp, lineage.MEMBER_NAME)
        with open(member, "w", encoding="utf-8") as f:
            f.write(record.to_json())
        files = {m: local_path(u) for m, u in partition.members.items()}
        if lineage.MEMBER_NAME in files:
            raise CkptError(partition.url, f"partition already has a {lineage.MEMBER_NAME}")
        files[lineage.MEMBER_NAME] = member
        size = package_nemo(files, out_path, overwrite=True)
    return Packaged(out_path, size, lineage.sha256_file(out_path), time.perf_counter() - start)


@task(name="package")
def package(
    partition: Partition, record: lineage.LineageRecord, work_dir: str, name: str
) -> Packaged:
    """Tar the partition and the lineage member into ``<work_dir>/package-<id>/<name>``."""
    out = os.path.join(process_folder(work_dir, "package"), name)
    return package_partition(partition, record, out)


@dataclass(frozen=True)
class Verified:
    """A passed comparison of source and output logits."""

    info: lineage.VerifyInfo
    seconds: float


_VERIFIERS: dict[str, VerifyProcess] = {}  # in use by a run
_IDLE: list[VerifyProcess] = []  # at most one, kept for this process's next run
_VERIFIERS_LOCK = threading.Lock()


def start_verifier(urls: Sequence[str] = (), mode: str = "auto") -> str | None:
    """A :class:`ckptcore.verify_process.VerifyProcess` for this run's verify step: the one a
    previous run in this process left idle, else a new one (which asks the stores of ``urls``,
    the run's source and destination, once while it waits); the key that names it (None:
    ``mode`` ``inline``, or ``auto`` in a process that has torch imported already, or it
    could not start). ``mode`` ``warm``: always a process.

    A new one's imports (torch and the reference model, ~2 s of CPU) run in another process
    while this one lists, opens and converts the source, and hold none of this process's
    GIL: a helper thread doing the same slowed listing and writing by more than it saved.
    Where torch is imported already, verifying here costs no import: a process would only
    add its start and a second opening of the source."""
    if mode not in ("auto", "warm", "inline"):
        raise CkptError(None, f"verify_process={mode!r}: expected auto, warm or inline")
    if mode == "inline" or (mode == "auto" and "torch" in sys.modules):
        return None
    proc = None
    with _VERIFIERS_LOCK:
        while _IDLE and proc is None:
            proc = _IDLE.pop()
            if not proc.alive():
                proc.close(wait=False)
                proc = None
    if proc is None:
        try:
            proc = VerifyProcess(warm=urls)
        except OSError as e:
            get_run_logger().warning("no verify process (%s): verifying in this process", e)
            return None
    key = uuid.uuid4().hex
    with _VERIFIERS_LOCK:
        _VERIFIERS[key] = proc
    return key


def release_verifier(key: str | None) -> None:
    """The run is done with the verify process ``key`` names: it is kept, idle, for the next
    run in this process (one at most; its imports are done), or let exit. Returns at once.
    An idle one holds no model (it returns that memory after each verify) and exits with
    this process (its stdin closes)."""
    if key is None:
        return
    with _VERIFIERS_LOCK:
        proc = _VERIFIERS.pop(key, None)
        if proc is not None and not _IDLE and proc.alive():
            _IDLE.append(proc)
            return
    if proc is not None:
        proc.close(wait=False)


@contextlib.contextmanager
def verifier_for_run(verify: bool, urls: Sequence[str], mode: str) -> Iterator[str | None]:
    """A verify process for the block (:func:`start_verifier`; None when not verifying or
    verifying here), released when the block ends."""
    key = start_verifier(urls, mode) if verify else None
    try:
        yield key
    finally:
        release_verifier(key)


def close_idle_verifiers() -> None:
    """Let the idle verify process (if any) exit now; returns at once."""
    with _VERIFIERS_LOCK:
        idle = list(_IDLE)
        _IDLE.clear()
    for proc in idle:
        proc.close(wait=False)


def verify_models(
    fetched: FetchedCheckpoint,
    packaged: Packaged,
    tolerance: float = 1e-5,
    verifier: str | None = None,
) -> Verified:
    """Source and ``.nemo`` on the same images; ``CkptError`` if the logits differ.

    In the verify process ``verifier`` names when there is one, else here; either way on the
    GPU where there is one."""
    start = time.perf_counter()
    with _VERIFIERS_LOCK:
        proc = _VERIFIERS.get(verifier) if verifier else None
    args = (fetched.open_url, packaged.path)
    kwargs: dict[str, Any] = dict(
        tolerance=tolerance, images=settings.verify_images(), cache=fetched.cache_dir
    )
    report = None
    if proc is not None:
        try:
            report = proc.verify(*args, **kwargs)
        except VerifyProcessGone as e:
            get_run_logger().warning("%s: verifying in this process", e)
    if report is None:
        report = api.verify(*args, **kwargs)
    return verified(report, packaged.path, time.perf_counter() - start)


def verified(report: api.VerifyReport, path: str, seconds: float) -> Verified:
    """A passed verify as the pipeline records it; ``CkptError`` (naming ``path``, the output)
    for a failed one: nothing is uploaded."""
    if not report.passed:
        raise CkptError(
            path,
            f"verify failed: max |logit diff| {report.max_abs_diff:.3g} > tolerance "
            f"{report.tolerance:g} on {report.images} images; nothing was uploaded",
        )
    info = lineage.VerifyInfo(
        max_abs_diff=report.max_abs_diff,
        tolerance=report.tolerance,
        images=report.images,
        passed=report.passed,
        device=report.device,
        method=report.method,
    )
    return Verified(info, seconds)


@task(name="verify")
def verify_output(
    fetched: FetchedCheckpoint,
    packaged: Packaged,
    tolerance: float = 1e-5,
    verifier: str | None = None,
) -> Verified:
    """Logits of source and output on deterministic images must agree within ``tolerance``
    (in the verify process ``verifier`` names, see :func:`start_verifier`)."""
    return verify_models(fetched, packaged, tolerance, verifier)
