"""Source checkpoints as tasks over ``ckptcore.listing`` (through ``ckptcore.api``).

``list-source`` names every file of one checkpoint with its size and a content identity.
``locate-source`` (``source_read="in-place"``, the default) reads a remote source where it is:
later steps fetch only the byte ranges they need, keeping them in a range cache so that verify
does not fetch them again. ``fetch`` (``source_read="download"``) downloads every remote file
into the work folder, hashing as it goes, cached by content. A local source is always used in
place.
"""

from __future__ import annotations

from prefect import task

from ckptcore.api import (
    FetchedCheckpoint,
    SourceListing,
    cache_location,
    describe_source,
    fetch_checkpoint,
    fetch_location,
    fetched_is_present,
    locate_checkpoint,
)
from ckptcore.errors import CkptError
from tasks.cache import ContentCache, run_cached
from tasks.leases import hold
from tasks.progress import Progress
from tasks.retry import storage_retries


def hold_source_folders(listing: SourceListing, work_dir: str) -> None:
    """This run uses the content-named folders of a remote source (downloaded files, range
    cache): no other run over the same bytes removes them meanwhile (:mod:`tasks.leases`)."""
    if not listing.local:
        hold(fetch_location(listing, work_dir))
        hold(cache_location(listing, work_dir))


@task(
    name="list-source",
    **storage_retries(),
)
def list_source(source: str, checkpoint: str = "last") -> SourceListing:
    """Name every file of the checkpoint with its size and ETag (local files: sha256).

    ``source`` is a training folder (``checkpoint``: ``last``, ``latest`` or a file name), a
    ``.../<name>.ckpt`` URL of one checkpoint, a ``.nemo`` file or an extracted ``.nemo``.
    """
    return describe_source(source, checkpoint, progress=Progress)


@task(name="locate-source")
def locate(listing: SourceListing, work_dir: str) -> FetchedCheckpoint:
    """Read the source in place (``source_read="in-place"``): nothing is downloaded; the
    repartition step fetches only the records it needs, into a range cache verify reuses."""
    return locate_checkpoint(listing, work_dir)


def source_for_reading(
    listing: SourceListing, work_dir: str, read: str = "in-place"
) -> FetchedCheckpoint:
    """``locate`` or (``read="download"``, remote sources) the cached ``fetch``."""
    if listing.local or read == "in-place":
        return locate(listing, work_dir)
    return run_cached(fetch, fetched_is_present, listing, work_dir)


@task(
    name="fetch",
    **storage_retries(),
    persist_result=True,
    cache_policy=ContentCache(),
)
def fetch(listing: SourceListing, work_dir: str) -> FetchedCheckpoint:
    """Download the listed files (sha256 of each, progress on the run page); local: in place.

    Cached by the listing's content digest (ETags / sha256) and the work folder; call it
    through :func:`tasks.cache.run_cached` with :func:`fetched_is_present`.
    """
    return fetch_checkpoint(listing, work_dir, progress=Progress)


def require_digest(fetched: FetchedCheckpoint, expected: str | None) -> None:
    """Fail when the source changed since the parent run listed it."""
    if expected and fetched.digest != expected:
        raise CkptError(
            fetched.source,
            f"source changed since it was listed: digest {fetched.digest[:12]}, expected {expected[:12]}",
        )
