"""``import-hf``: a transformers or timm ViT folder -> a verified ``.nemo`` with lineage
(deployment ``import-hf/vit``)."""

from __future__ import annotations

from prefect import flow

from ckptcore.api import fetch_location, fetched_is_present
from ckptcore.errors import CkptError
from tasks import settings
from tasks.cache import run_cached
from tasks.community import import_community, verify_import
from tasks.convert import package
from tasks.leases import hold, run_holds
from tasks.lineage import finish_lineage, start_lineage
from tasks.publish import check_destination, clean_work, report_lineage, upload_task
from tasks.source import fetch, list_source
from tasks.writers import one_writer


@flow(name="import-hf")
def import_hf_vit(
    source: str,
    destination: str,
    target_tp: int | None = None,
    target_pp: int | None = None,
    precision: str = "keep",
    layout: str = "conv1",
    source_kind: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    tolerance: float = 1e-5,
) -> dict[str, str]:
    """Import a community ViT (``config.json`` + safetensors/bin) into a NeMo ``.nemo``.

    Args:
        source: folder URL (``s3://...`` or local) with ``config.json`` and the weights.
        destination: URL of the ``.nemo``.
        target_tp: tensor-parallel size of the output (default 1).
        target_pp: pipeline-parallel size of the output (default 1).
        precision: ``keep``, or ``fp32``/``bf16``/``fp16``.
        layout: NeMo's patch embedding, ``conv1`` (NeMo >= 2.0) or ``linear_encoder``.
        source_kind: ``transformers`` or ``timm`` (default: detected from ``config.json``).
        verify: compare the mapped source and the ``.nemo`` on deterministic images.
        overwrite: replace an existing destination.
        tolerance: the verify bound.
    """
    with settings.pinned() as config, run_holds(), one_writer(destination):
        listing = list_source(source)
        if listing.kind != "community":
            raise CkptError(
                source, f"is a {listing.kind} checkpoint; expected a folder with config.json"
            )
        destination = check_destination(destination, listing.root, overwrite)
        work = config.work_folder()
        if not listing.local:  # runs over the same bytes share the downloaded files
            hold(fetch_location(listing, work))
        fetched = run_cached(fetch, fetched_is_present, listing, work)
        partition = import_community(
            fetched, target_tp, target_pp, precision, layout, source_kind, work
        )
        record = start_lineage(listing, fetched, partition, destination)
        packaged = package(partition, record, work, destination.rsplit("/", 1)[-1])
        verified = (
            verify_import(fetched, packaged, layout, source_kind, tolerance) if verify else None
        )
        upload = upload_task(destination, listing.root)
        uploaded = upload(packaged.path, finish_lineage(record, packaged, verified))
        report_lineage(uploaded.record)
        work_files = [partition.url.rsplit("/", 1)[0], packaged.path.rsplit("/", 1)[0]]
        if not listing.local:
            work_files.append(fetch_location(listing, work))
        clean_work(work, work_files)
        return uploaded.record.summary()
