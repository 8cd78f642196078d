"""``repartition``: the GPU-pool half of ``convert`` (deployment ``repartition/vit``).

The parent names the source, the target layout and a folder under the scratch prefix; it
creates this run before it lists the source itself. This run lists and reads the source on its
own machine (in place, or downloaded with ``source_read="download"``), repartitions it and
leaves the rank files plus ``partition.json`` (which names the digest of the source files it
read: the parent checks it against its own listing) under the folder. ``source_digest``, where
given, is checked here first.
"""

from __future__ import annotations

import os
from typing import Literal

from prefect import flow

from ckptcore.api import cache_location, fetch_location
from tasks import settings
from tasks.cache import run_cached
from tasks.convert import partition_is_present, repartition
from tasks.leases import run_holds
from tasks.publish import clean_work
from tasks.source import hold_source_folders, list_source, require_digest, source_for_reading


@flow(name="repartition")
def repartition_vit(
    source: str,
    output_url: str,
    checkpoint: str = "last",
    source_digest: str | None = None,
    target_tp: int | None = None,
    target_pp: int | None = None,
    precision: str = "keep",
    source_read: Literal["in-place", "download"] = "in-place",
) -> dict:
    """Repartition one checkpoint to the target TP/PP into ``output_url``.

    Args:
        source: the checkpoint (training folder, ``.nemo``) as the parent listed it.
        output_url: folder (normally under ``CKPT_SCRATCH_URL``) for the rank files.
        checkpoint: the checkpoint file name in a training folder.
        source_digest: a digest the source files must have (a mismatch fails the run).
        target_tp: output tensor-parallel size (default: the source's).
        target_pp: output pipeline-parallel size (default: the source's).
        precision: ``keep`` or a target precision.
        source_read: read a remote source ``in-place`` or ``download`` it first.
    """
    with settings.pinned() as config, run_holds():
        work = config.work_folder()  # whatever this run still holds is let go when it ends
        listing = list_source(source, checkpoint)
        downloaded_here = not listing.local and not os.path.exists(fetch_location(listing, work))
        if downloaded_here:  # ours to remove when done: no other run removes it meanwhile
            hold_source_folders(listing, work)
        fetched = source_for_reading(listing, work, source_read)
        require_digest(fetched, source_digest)
        partition = run_cached(
            repartition, partition_is_present, fetched, target_tp, target_pp, precision, output_url
        )
        if downloaded_here:  # not shared with a parent run on this machine: ours to remove
            clean_work(work, [fetch_location(listing, work), cache_location(listing, work)])
        return partition.manifest()
