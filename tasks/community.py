"""Community (transformers / timm) ViT folders -> ``.nemo``: a thin task over
``ckptcore.community.api.import_hf`` (imported lazily), and a logits check of the result."""

from __future__ import annotations

import os
import tarfile
import time
from dataclasses import replace

from prefect import task

from ckptcore.api import FetchedCheckpoint, process_folder
from tasks import settings
from tasks.convert import Packaged, Partition, Verified, verified
from tasks.progress import Progress


def extract_nemo(path: str, folder: str) -> dict[str, str]:
    """The regular-file members of a ``.nemo`` written into ``folder``: {member: path}."""
    members = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            if not info.isfile():
                continue
            name = info.name.removeprefix("./")
            tar.extract(info, folder, filter="data")
            members[name] = os.path.join(folder, info.name)
    return members


def import_to_partition(
    fetched: FetchedCheckpoint,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    layout: str,
    source_kind: str | None,
    work_dir: str,
) -> Partition:
    """``import_hf`` into the work folder; its members become a partition to package."""
    from ckptcore.community.api import import_hf

    out = process_folder(work_dir, "import")  # a killed run's is removed by the next
    nemo = os.path.join(out, "imported.nemo")
    os.makedirs(out, exist_ok=True)
    progress = Progress(f"import {fetched.source}", sum(f.size_bytes for f in fetched.files))
    report = import_hf(
        fetched.local_root,
        nemo,
        target_tp=target_tp,
        target_pp=target_pp,
        layout=layout,
        source_kind=source_kind,
        precision=precision,
        overwrite=True,
        progress=progress.tensor,
    )
    progress.finish()
    members = extract_nemo(nemo, os.path.join(out, "members"))
    os.unlink(nemo)
    notes = (f"imported from a {report.source_kind} checkpoint", *report.layout.notes)
    return Partition(
        url=os.path.join(out, "members"),
        members=members,
        layout=replace(report.layout, step=None, epoch=None, notes=notes),
        tensor_bytes=report.tensor_bytes,
        seconds=report.seconds,
    )


@task(name="import-hf")
def import_community(
    fetched: FetchedCheckpoint,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    layout: str,
    source_kind: str | None,
    work_dir: str,
) -> Partition:
    """A transformers/timm ViT folder -> NeMo rank files at the target TP/PP."""
    return import_to_partition(
        fetched, target_tp, target_pp, precision, layout, source_kind, work_dir
    )


def verify_community(
    fetched: FetchedCheckpoint,
    packaged: Packaged,
    layout: str,
    source_kind: str | None,
    tolerance: float = 1e-5,
) -> Verified:
    """:func:`ckptcore.community.api.verify_import` of the fetched folder and the ``.nemo``."""
    from ckptcore.community.api import verify_import

    start = time.perf_counter()
    report = verify_import(
        fetched.local_root, packaged.path, layout, source_kind, tolerance, settings.verify_images()
    )
    return verified(report, packaged.path, time.perf_counter() - start)


@task(name="verify")
def verify_import(
    fetched: FetchedCheckpoint,
    packaged: Packaged,
    layout: str,
    source_kind: str | None,
    tolerance: float = 1e-5,
) -> Verified:
    """Mapped community weights and the ``.nemo`` agree on deterministic images."""
    return verify_community(fetched, packaged, layout, source_kind, tolerance)
