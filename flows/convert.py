"""``convert``: a training checkpoint in object storage -> a verified ``.nemo`` with lineage.

    list-source -> check-destination -> build the .nemo -> verify -> upload (+ sidecar,
    metadata, asset) -> report-lineage -> clean-work

One run writes a destination at a time: from check-destination to report-lineage the run
holds a Prefect global concurrency limit named by the destination, and a second run for it
waits there. Verify and upload run in one Prefect transaction with the build: a failure rolls
it back (a streamed upload is aborted, an uncommitted object removed), so nothing appears at
the destination. The ``.nemo`` is built one of five ways, chosen by parameters:

| route | when | steps |
|---|---|---|
| ``assembled`` | ``runner`` names a task runner (``assemble="in-place"``) | ``assemble-items``: ``write-piece`` tasks on threads, Dask or Ray write the final archive in place and check what they wrote; this run writes ``lineage.json`` and commits |
| ``mapped`` | ``runner`` and ``assemble="staged"`` | ``repartition-items`` (one ``write-item`` task per target rank file, staged, resumable) -> package |
| ``deployment`` | ``repartition="deployment"``, or ``auto`` in a deployed run | the ``repartition/vit`` run created when this run began (in ``gpu-pool``) -> download-partition -> package |
| ``stream`` | an ``s3://`` destination and ``upload="stream"`` | write-nemo (repartition + package in one pass, a multipart upload following the file) |
| ``inline`` | otherwise | locate-source (or ``fetch`` with ``source_read="download"``) -> repartition -> package |

A source in object storage is read in place: only the byte ranges of the model weights are
fetched (never the optimizer state), into a range cache verify reads again; the objects'
ETags are checked again after reading. Run it locally with ``convert_vit(source=...,
destination=...)``; deployed as ``convert/vit``.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.transactions import transaction

from ckptcore.api import default_destination
from flows.routes import ConvertJob
from tasks import settings
from tasks.convert import verifier_for_run, verify_output
from tasks.handoff import handed_off
from tasks.leases import run_holds
from tasks.publish import check_destination, clean_work, publish, report_lineage
from tasks.source import hold_source_folders, list_source
from tasks.writers import one_writer

Repartition = Literal["auto", "inline", "deployment"]
Upload = Literal["stream", "after"]
SourceRead = Literal["in-place", "download"]
VerifyProcess = Literal["auto", "warm", "inline"]
Assemble = Literal["in-place", "staged"]


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
    repartition: Repartition = "auto",
    upload: Upload = "stream",
    source_read: SourceRead = "in-place",
    verify_process: VerifyProcess = "auto",
    assemble: Assemble = "in-place",
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
            ``CKPT_SCRATCH_URL``); in the mapped route, where the items write theirs unless
            ``CKPT_STAGING_URL`` is set.
        runner: spread the work over tasks (see ``assemble``) on ``threads[:N]``, ``dask``
            (a LocalCluster of ``CKPT_RUNNER_WORKERS`` processes), ``dask://host:8786`` (a
            running scheduler), ``ray`` or ``ray://host:10001``; unset or ``inline``: one
            process.
        repartition: ``deployment`` hands repartitioning to the ``repartition/vit`` deployment
            (``CKPT_REPARTITION_DEPLOYMENT``), ``inline`` does it in this run, ``auto``: the
            deployment when this run is deployed.
        upload: to ``s3://``, ``stream`` sends the ``.nemo`` while it is written and completes
            the upload after verify; ``after`` packages, verifies, then uploads with the full
            object metadata (sha256 and verify result; streamed, the sidecar has them).
        source_read: a remote source is read ``in-place`` (ranged reads of only the records the
            conversion needs) or ``download``ed first (with the sha256 of each file).
        verify_process: ``warm`` verifies in a child process started when the run begins (its
            imports overlap the conversion), ``inline`` in this process, ``auto``: ``warm``
            unless torch is imported here already.
        assemble: with a ``runner``, ``in-place``: the workers write the final ``.nemo``
            straight into the destination (S3 multipart parts, or their places in one file)
            and check what they wrote against the source, this run writes only
            ``lineage.json`` and the end of the archive; ``staged``: items are staged
            (``CKPT_STAGING_URL``), found again by a rerun, and packaged here.
    """
    job = ConvertJob(
        source, destination, checkpoint, target_tp, target_pp, precision, verify, overwrite,
        tolerance, scratch_url, runner, repartition, upload, source_read, verify_process,
        assemble,
    )  # fmt: skip
    return convert_pipeline(job)


def convert_pipeline(job: ConvertJob) -> dict[str, str]:
    """The steps of ``convert`` (and ``reshard``), inside a flow run."""
    with (
        settings.pinned() as config,  # loaded once; recorded in the lineage
        run_holds(),  # the content-named work folders this run uses, let go when it ends
        verifier_for_run(job.verify, job.urls(), job.verify_process) as verifier,
        handed_off(job.start_handoff) as handoff,  # created first: its start overlaps ours
    ):
        listing = list_source(job.source, job.checkpoint)
        job.require_kind(listing.kind)
        destination = job.destination or default_destination(listing)
        with one_writer(destination):  # another run for it waits here until this one ends
            destination = check_destination(destination, listing.root, job.overwrite)
            hold_source_folders(listing, config.work_folder())
            with transaction():  # a failure up to the commit rolls back: nothing is published
                built = job.build(listing, destination, handoff)
                verified = (
                    built.verified  # checked where the workers wrote it
                    if built.archive is not None or not job.verify
                    else verify_output(built.fetched, built.packaged, job.tolerance, verifier)
                )
                uploaded = publish(built, verified)
            report_lineage(uploaded.record)
        clean_work(config.work_folder(), built.work_files, built.shared_roots)
        return uploaded.record.summary()
