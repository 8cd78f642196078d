"""``convert``: a training checkpoint in object storage -> a verified ``.nemo`` with lineage.

    list-source -> locate-source -> repartition (here, or the ``repartition/vit`` deployment
    in ``gpu-pool``) -> package (with ``lineage.json``) -> verify -> upload (+ sidecar,
    metadata, asset) -> report-lineage -> clean-work

Deployed, repartitioning is the ``repartition/vit`` deployment's: its run is created first,
before the listing, so its worker pickup and process start overlap this run's listing and
destination check; it lists the source itself, and the partition it leaves under the scratch
prefix must name the digest this run listed. A run that fails meanwhile cancels it.

Repartitioning here into an ``s3://`` destination (``CKPT_UPLOAD=stream``, the default), the
middle is streamed instead:

    write-nemo (repartition + package in one pass; a multipart upload follows the file as it
    is written) -> verify (while the last parts go up) -> upload (complete the multipart upload,
    then the sidecar; aborted if anything before it failed)

A source in object storage is read in place: repartition fetches only the byte ranges of the
model weights (never the optimizer state), keeping them in a range cache in the work folder
that verify reads again; the source files are identified by their ETags, checked again after
reading. ``CKPT_SOURCE_READ=download`` fetches every file first instead (``fetch``, with the
sha256 of each file in the lineage).

The mapped mode (a ``runner`` parameter or ``CKPT_RUNNER``: ``threads``, ``dask``,
``dask://host:8786``, ``ray``...) replaces locate + repartition by the ``repartition-items``
subflow: the plan's work items (one per target rank file) run as ``write-item`` tasks on that
task runner, each reading its byte ranges of the source in place and writing its rank file to
the staging location; then package (streaming the staged files in) -> verify -> upload as
above.

Run it locally with ``convert_vit(source=..., destination=...)``; deployed as ``convert/vit``.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, replace
from uuid import UUID

from prefect import flow, runtime, unmapped
from prefect.artifacts import create_table_artifact
from prefect.futures import wait
from prefect.logging import get_run_logger

from ckptcore.api import plan_conversion
from ckptcore.errors import CkptError
from ckptcore.formats.nemo import CONFIG_NAME, dump_config
from ckptcore.lineage import LineageRecord
from ckptcore.sources import open_checkpoint
from ckptcore.storage import is_local, join, local_path
from ckptcore.workplan import work_items
from tasks import settings
from tasks.cache import run_cached
from tasks.convert import (
    Packaged,
    Partition,
    download_partition,
    keyed_folder,
    package,
    partition_is_present,
    partition_location,
    release_verifier,
    repartition,
    require_same_source,
    start_verifier,
    verify_output,
)
from tasks.handoff import create_subflow, stop_run, wait_for_run
from tasks.items import (
    MappedPartition,
    commit_partition,
    items_location,
    make_task_runner,
    package_staged,
    parse_runner,
    source_objects,
    write_item,
)
from tasks.leases import hold, run_holds
from tasks.lineage import RemoteRun, finish_lineage, start_lineage
from tasks.publish import check_destination, clean_work, report_lineage, upload_task
from tasks.source import (
    FetchedCheckpoint,
    SourceListing,
    cache_location,
    default_destination,
    fetch_location,
    hold_source_folders,
    list_source,
    locate_checkpoint,
    source_for_reading,
)
from tasks.stream import discard_pending, streams_upload, write_nemo


def repartition_remotely() -> bool:
    """Hand repartitioning to its deployment? ``CKPT_REPARTITION``, else: when deployed."""
    mode = settings.repartition_mode()
    if mode == "auto":
        return runtime.deployment.id is not None
    return mode == "deployment"


@dataclass(frozen=True)
class Handoff:
    """The ``repartition/vit`` run this run created when it began (:func:`start_repartition`)."""

    deployment: str
    run_id: UUID
    location: str  # the partition's folder under the scratch prefix
    started: float


def handoff_location(
    scratch: str, target_tp: int | None, target_pp: int | None, precision: str
) -> str:
    """A folder under ``scratch`` for this flow run's repartition run: a retry of the run finds
    its partition again (the partition names the source digest it was written from)."""
    run_id = runtime.flow_run.id or uuid.uuid4().hex  # outside a flow run: its own folder
    return keyed_folder(scratch, "handoff", [str(run_id), target_tp, target_pp, str(precision)])


def start_repartition(
    source: str,
    checkpoint: str,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    scratch_url: str | None,
) -> Handoff:
    """Create the ``repartition/vit`` run (in ``gpu-pool``) before this run lists its source:
    its worker pickup and process start (~2.5 s) overlap the listing and the destination
    check here. It lists the source itself; the partition it leaves names the digest it
    read, which must equal this run's (:func:`tasks.convert.require_same_source`)."""
    name = settings.repartition_deployment()
    location = handoff_location(settings.scratch_url(scratch_url), target_tp, target_pp, precision)
    run = create_subflow(
        name,
        {
            "source": source,
            "checkpoint": checkpoint or "last",
            "target_tp": target_tp,
            "target_pp": target_pp,
            "precision": precision,
            "output_url": location,
        },
    )
    return Handoff(name, run.id, location, time.perf_counter())


def finish_repartition(handoff: Handoff) -> RemoteRun:
    """Wait for the repartition run to complete."""
    child = wait_for_run(handoff.run_id, settings.poll_seconds(), settings.repartition_timeout())
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "without a state"
        raise RuntimeError(f"repartition run {child.name} ({child.id}) ended {state}")
    seconds = time.perf_counter() - handoff.started
    return RemoteRun(handoff.deployment, str(child.id), child.name, child.work_pool_name, seconds)


def abandon_repartition(handoff: Handoff) -> None:
    """This run failed: cancel its repartition run if that is not over."""
    try:
        was = stop_run(handoff.run_id)
    except Exception as e:  # noqa: BLE001 - never hide the run's own error
        get_run_logger().warning("could not cancel repartition run %s: %s", handoff.run_id, e)
        return
    if was is not None:
        get_run_logger().info("cancelled repartition run %s (%s)", handoff.run_id, was)


@flow(name="repartition-items", validate_parameters=False)
def repartition_items(
    listing: SourceListing,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    staging: str,
    runner: str = "threads",
    cache_dir: str | None = None,
) -> MappedPartition:
    """The repartition step as one task per target rank file, on this flow's task runner.

    Plans here (reading only the source's headers), maps ``write-item`` over the plan's files
    (each task opens the source itself and streams its file to ``<staging>/items-<key>/``),
    then commits the partition
    (``model_config.yaml``, ``partition.json``). Items found complete from an earlier run with
    the same source and plan are not written again. ``runner`` only names the runner in the
    result; ``with_options(task_runner=...)`` chooses it.
    """
    start = time.perf_counter()
    objects = source_objects(listing)
    checkpoint = listing.checkpoint or "last"
    with open_checkpoint(listing.root, checkpoint, cache=cache_dir) as ck:
        plan = plan_conversion(ck, target_tp, target_pp, precision)
        planned = work_items(ck, plan, with_ranges=False)
        source_tp, source_pp, step, epoch, notes = ck.tp, ck.pp, ck.step, ck.epoch, ck.notes
    location = items_location(staging, listing, plan)
    hold(location)
    members = {fp.path: join(location, fp.path) for fp in plan.files}
    futures = write_item.map(
        unmapped(listing.root),
        unmapped(checkpoint),
        unmapped(objects),
        list(plan.files),
        list(members.values()),
        [w.read_bytes for w in planned],
        unmapped(cache_dir),
    )
    wait(futures)  # let every item finish before failing on one: a rerun resumes
    items = tuple(f.result() for f in futures)
    fetched = locate_checkpoint(listing, settings.work_dir())
    partition = Partition(
        url=location,
        members={**members, CONFIG_NAME: join(location, CONFIG_NAME)},
        plan_digest=plan.digest(),
        source_tp=source_tp,
        source_pp=source_pp,
        target_tp=plan.target.tp,
        target_pp=plan.target.pp,
        precision=str(plan.config.get("precision")),
        step=step,
        epoch=epoch,
        tensor_bytes=sum(fp.write_bytes for fp in plan.files),
        seconds=time.perf_counter() - start,
        notes=tuple(notes),
    )
    commit_partition(partition, dump_config(plan.config))
    run_id = runtime.flow_run.id
    mapped = MappedPartition(
        partition,
        fetched,
        items,
        runner,
        str(run_id) if run_id else None,
        runtime.flow_run.name if run_id else None,
    )
    create_table_artifact(mapped.table(), key="work-items", description=mapped.note())
    return mapped


def run_mapped(
    listing: SourceListing,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    runner: str,
    scratch_url: str | None = None,
) -> MappedPartition:
    """``repartition-items`` as a subflow on the task runner ``runner`` names."""
    spec = parse_runner(runner, settings.runner_workers())
    staging = settings.staging_url(scratch_url)
    if spec.address and is_local(staging):
        get_run_logger().warning(
            "items on %s write to the local folder %s: every worker must see it at that path "
            "(set CKPT_STAGING_URL or CKPT_SCRATCH_URL to object storage otherwise)",
            spec.address,
            staging,
        )
    subflow = repartition_items.with_options(task_runner=make_task_runner(spec))
    # threads share this machine with verify: what they fetch, verify then reads locally
    work = settings.work_dir()
    cache = None if listing.local or spec.kind != "threads" else cache_location(listing, work)
    return subflow(listing, target_tp, target_pp, precision, staging, spec.describe(), cache)


def _work_files(
    listing: SourceListing,
    work: str,
    partition: Partition,
    location: str,
    packaged: Packaged,
) -> list[str]:
    files = [os.path.dirname(packaged.path), partition.url, location]
    if not listing.local:
        files += [fetch_location(listing, work), cache_location(listing, work)]
    return list(dict.fromkeys(files))


def convert_pipeline(
    source: str,
    destination: str | None = None,
    checkpoint: str = "last",
    target_tp: int | None = None,
    target_pp: int | None = None,
    precision: str = "keep",
    verify: bool = True,
    overwrite: bool = False,
    tolerance: float = 1e-5,
    scratch_url: str | None = None,
    kinds: tuple[str, ...] = ("ptl", "nemo", "nemo-dir"),
    runner: str | None = None,
) -> dict[str, str]:
    """The steps of ``convert`` (and ``reshard``), called inside a flow run.

    Verifying, a verify process starts first: it imports torch and the model while the steps
    before verify run (see :func:`tasks.convert.start_verifier`). Deployed, the repartition
    run is created next (:func:`start_repartition`), and cancelled if this run fails."""
    verifier = start_verifier([u for u in (source, destination) if u]) if verify else None
    handoff = None
    try:
        with run_holds():  # whatever this run still holds is let go when it ends
            mode = settings.runner(runner)
            if mode is None and repartition_remotely():
                handoff = start_repartition(
                    source, checkpoint, target_tp, target_pp, precision, scratch_url
                )
            return _convert(
                source, destination, checkpoint, target_tp, target_pp, precision, verify,
                overwrite, tolerance, scratch_url, kinds, mode, verifier, handoff,
            )  # fmt: skip
    except BaseException:
        if handoff is not None:
            abandon_repartition(handoff)
        raise
    finally:
        release_verifier(verifier)


def _convert(
    source: str,
    destination: str | None,
    checkpoint: str,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    verify: bool,
    overwrite: bool,
    tolerance: float,
    scratch_url: str | None,
    kinds: tuple[str, ...],
    mode: str | None,
    verifier: str | None,
    handoff: Handoff | None,
) -> dict[str, str]:
    listing = list_source(source, checkpoint)
    if listing.kind not in kinds:
        raise CkptError(source, f"is a {listing.kind} checkpoint; expected {' or '.join(kinds)}")
    destination = check_destination(
        destination or default_destination(listing), listing.root, overwrite
    )
    work = settings.work_dir()
    hold_source_folders(listing, work)  # runs over the same bytes share them
    check = _Check(verify, tolerance, verifier)
    if mode is not None:
        return _convert_mapped(
            listing, destination, target_tp, target_pp, precision, check, work, mode, scratch_url
        )  # fmt: skip
    fetched = source_for_reading(listing, work)
    remote = None
    if handoff is None and streams_upload(destination):
        return _convert_streamed(
            listing, fetched, destination, target_tp, target_pp, precision, check, work
        )  # fmt: skip
    if handoff is not None:
        remote = finish_repartition(handoff)
        location = handoff.location
        partition = download_partition(location, work)
        require_same_source(partition, fetched)
    else:
        location = partition_location(work, fetched, target_tp, target_pp, precision)
        hold(location)
        partition = run_cached(
            repartition, partition_is_present, fetched, target_tp, target_pp, precision, location
        )
    record = start_lineage(listing, fetched, partition, destination, remote)
    packaged = package(partition, record, work, destination.rsplit("/", 1)[-1])
    files = _work_files(listing, work, partition, location, packaged)
    return _verify_and_publish(listing, fetched, packaged, record, check, work, files)


@dataclass(frozen=True)
class _Check:
    """Whether to verify, within what tolerance, in which verify process (if any)."""

    verify: bool
    tolerance: float
    verifier: str | None


def _verify_and_publish(
    listing: SourceListing,
    fetched: FetchedCheckpoint,
    packaged: Packaged,
    record: LineageRecord,
    check: _Check,
    work: str,
    work_files: list[str],
    pending: str | None = None,
    streamed: bool = False,
) -> dict[str, str]:
    """The end of every path: verify -> upload (+ sidecar, asset) -> report-lineage ->
    clean-work. ``streamed``: ``packaged`` came from write-nemo, whose upload ``pending`` names;
    it is completed by upload, or aborted when anything here fails first."""
    try:
        verified = None
        if check.verify:
            verified = verify_output(fetched, packaged, check.tolerance, check.verifier)
            release_verifier(check.verifier)
        final = finish_lineage(record, packaged, verified, streamed=streamed)
        upload = upload_task(record.destination, listing.root, streamed=streamed)
        uploaded = (
            upload(pending, packaged.path, final) if streamed else upload(packaged.path, final)
        )
    finally:
        discard_pending(pending)  # still pending: something failed, nothing may appear
    report_lineage(uploaded.record)
    clean_work(work, work_files)
    return uploaded.record.summary()


def _convert_streamed(
    listing: SourceListing,
    fetched: FetchedCheckpoint,
    destination: str,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    check: _Check,
    work: str,
) -> dict[str, str]:
    """``convert_pipeline`` with the upload following the write (see the module doc)."""
    written = write_nemo(listing, fetched, target_tp, target_pp, precision, destination, work)
    files = [os.path.dirname(written.packaged.path)]
    if not listing.local:
        files += [fetch_location(listing, work), cache_location(listing, work)]
    return _verify_and_publish(
        listing, fetched, written.packaged, written.record, check, work, files,
        pending=written.upload, streamed=True,
    )  # fmt: skip


def _convert_mapped(
    listing: SourceListing,
    destination: str,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    check: _Check,
    work: str,
    runner: str,
    scratch_url: str | None,
) -> dict[str, str]:
    """``convert_pipeline`` in the mapped mode: ``repartition-items`` instead of fetch and
    repartition; the source is verified against where it is (no local copy of it is made)."""
    mapped = run_mapped(listing, target_tp, target_pp, precision, runner, scratch_url)
    fetched, partition = mapped.fetched, mapped.partition
    record = start_lineage(listing, fetched, partition, destination)
    record = replace(record, notes=[*record.notes, mapped.note()])
    packaged = package_staged(partition, record, work, destination.rsplit("/", 1)[-1])
    files = [os.path.dirname(packaged.path), partition.url, *_cache(fetched)]
    summary = _verify_and_publish(listing, fetched, packaged, record, check, work, files)
    staging = partition.url.rsplit("/", 1)[0]
    if is_local(staging) and not _under(local_path(partition.url), work):
        clean_work(staging, [partition.url])  # a shared staging folder outside the work folder
    return summary


def _cache(fetched: FetchedCheckpoint) -> list[str]:
    return [fetched.cache_dir] if fetched.cache_dir else []


def _under(path: str, folder: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


@flow(name="convert")
def convert_vit(
    source: str,
    destination: str | None = None,
    checkpoint: str = "last",
    target_tp: int | None = None,
    target_pp: int | None = None,
    precision: str = "keep",
    verify: bool = True,
    overwrite: bool = False,
    tolerance: float = 1e-5,
    scratch_url: str | None = None,
    runner: str | None = None,
) -> dict[str, str]:
    """Convert a NeMo ViT training checkpoint into a verified ``.nemo`` with lineage.

    Args:
        source: training checkpoint folder (``s3://...`` or local), or the URL of one
            checkpoint in it (``.../checkpoints/<name>.ckpt``, any rank folder).
        destination: URL of the ``.nemo``; default ``<folder>/nemo/<checkpoint stem>.nemo``.
        checkpoint: ``last`` (the ``-last.ckpt``), ``latest`` (highest step) or a file name.
        target_tp: tensor-parallel size of the output (default: the source's).
        target_pp: pipeline-parallel size of the output (default: the source's).
        precision: ``keep``, or ``fp32``/``bf16``/``fp16`` to cast the weights.
        verify: compare source and output logits on deterministic images (max diff <=
            ``tolerance``); a failed comparison uploads nothing.
        overwrite: replace an existing destination.
        tolerance: the verify bound (1e-5 for fp32; loosen it when changing precision).
        scratch_url: where the repartition deployment leaves its files (default
            ``CKPT_SCRATCH_URL``); only used when deployed. In the mapped mode, where the
            items write theirs unless ``CKPT_STAGING_URL`` is set.
        runner: map the repartition over the plan's work items (one task per target rank
            file) on ``threads[:N]``, ``dask`` (a LocalCluster of ``CKPT_RUNNER_WORKERS``
            processes), ``dask://host:8786`` (a running scheduler), ``ray`` or
            ``ray://host:10001``; default ``CKPT_RUNNER``, unset: one process as before.
            ``inline`` forces one process.
    """
    return convert_pipeline(
        source,
        destination,
        checkpoint,
        target_tp,
        target_pp,
        precision,
        verify,
        overwrite,
        tolerance,
        scratch_url,
        runner=runner,
    )
