"""Streamed publishing: write the ``.nemo`` once, locally, while its upload follows it.

``write-nemo`` plans the repartitioning and writes the archive (rank files produced on the fly,
``lineage.json`` included) to a work file; a :class:`ckptcore.follow.FollowingDigest` hashes it
and, for an ``s3://`` destination, a :class:`ckptcore.multipart.FollowingUpload` sends its
parts as they are written. The task returns once the file is whole; the upload goes on while
``verify`` checks that file, and ``upload`` (:func:`tasks.publish.commit_nemo`) completes it only
then. Whatever fails in between rolls back the run's transaction, whose hook aborts it
(:func:`abort_pending_upload`): nothing appears at the destination. This replaces repartition -> package -> upload-after, which wrote every byte three
times locally and sent it only at the end.

A pending upload lives in this process (the flow's). Where it is gone (a retried ``upload``
task, another process), ``upload`` sends the local file again instead.

No result cache: a rerun writes again, reading the source from the range cache the failed run
left in the work folder (so nothing is fetched twice).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from ckptcore import lineage
from ckptcore.api import (
    FetchedCheckpoint,
    FollowingDigest,
    FollowingUpload,
    MemberSource,
    SourceListing,
    check_unchanged,
    is_s3,
    nemo_members,
    open_checkpoint,
    part_size_for,
    plan_conversion,
    process_folder,
    write_nemo_file,
)
from tasks import settings
from tasks.convert import Packaged
from tasks.lineage import start_lineage
from tasks.progress import Progress
from tasks.retry import storage_retries

PENDING_NAME = "pending_upload"  # the transaction value naming the upload
_PENDING: dict[str, FollowingUpload] = {}
_LOCK = threading.Lock()


def take_pending(key: str | None) -> FollowingUpload | None:
    """The pending upload ``key`` names, removed from the registry (None if gone)."""
    if key is None:
        return None
    with _LOCK:
        return _PENDING.pop(key, None)


def discard_pending(key: str | None) -> None:
    """Abort the upload ``key`` names if it is still pending (after a failure, say)."""
    pending = take_pending(key)
    if pending is not None:
        pending.abort()


@dataclass(frozen=True)
class Written:
    """The ``.nemo`` in the work folder, its lineage record (as archived), and the key of its
    pending upload in this process (None: none was started)."""

    packaged: Packaged
    record: lineage.LineageRecord
    upload: str | None


@task(name="write-nemo", cache_policy=NO_CACHE, **storage_retries())
def write_nemo(
    listing: SourceListing,
    fetched: FetchedCheckpoint,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    destination: str,
    work_dir: str,
) -> Written:
    """Repartition into the ``.nemo`` (lineage member included) in one pass, uploading it to an
    ``s3://`` destination as it is written; the upload is completed later by ``upload``."""
    start = time.perf_counter()
    out_dir = process_folder(work_dir, "package")  # a killed run's is removed by the next
    out_path = os.path.join(out_dir, destination.rsplit("/", 1)[-1])
    with open_checkpoint(fetched.open_url, cache=fetched.cache_dir) as ck:
        plan = plan_conversion(ck, target_tp, target_pp, precision)
        record = start_lineage(listing, fetched, lineage.Layout.of(ck, plan), destination)
        tensor_bytes = sum(fp.write_bytes for fp in plan.files)
        progress = Progress(
            f"repartition to TP={plan.target.tp} PP={plan.target.pp} into {out_path}", tensor_bytes
        )
        members = nemo_members(ck, plan, progress=progress.tensor)
        members[lineage.MEMBER_NAME] = record.to_json().encode()
        expected = sum(m.size if isinstance(m, MemberSource) else len(m) for m in members.values())
        open(out_path, "wb").close()  # the followers open it before the first byte
        upload = None
        # Uploading: the sha256 is taken later, while the store completes the upload (a spare
        # core then) instead of here, where every core is busy moving bytes.
        digest = None if is_s3(destination) else FollowingDigest(out_path)
        try:
            if is_s3(destination):
                upload = FollowingUpload(
                    out_path,
                    destination,
                    part_size_for(expected, settings.upload_chunk_bytes()),
                    settings.upload_concurrency(),
                    metadata=record.object_metadata(),
                    checksum=settings.upload_checksum(),
                )
            size = write_nemo_file(members, out_path, [f for f in (digest, upload) if f])
            sha256 = digest.hexdigest() if digest is not None else None
            if fetched.in_place:
                check_unchanged(fetched)  # the bytes read all come from the objects as listed
        except BaseException:
            if digest is not None:
                digest.cancel()
            if upload is not None:
                upload.abort()
            raise
        progress.finish()
    key = None
    if upload is not None:
        key = uuid.uuid4().hex
        with _LOCK:
            _PENDING[key] = upload
        txn = get_transaction()
        if txn is not None:  # what the rollback hook aborts
            txn.set(PENDING_NAME, key)
    seconds = time.perf_counter() - start
    packaged = Packaged(out_path, size, sha256, seconds)
    return Written(packaged, record.with_timing("write", seconds), key)


@write_nemo.on_rollback
def abort_pending_upload(txn: Transaction) -> None:
    """The run's transaction rolled back (verify or the commit failed): abort the multipart
    upload write-nemo started, so nothing appears at the destination."""
    discard_pending(txn.get(PENDING_NAME, None))
