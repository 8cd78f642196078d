"""Find the finished training checkpoints under a prefix that have no lineage record yet."""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefect import task

from ckptcore import lineage
from ckptcore.api import (
    SourceListing,
    default_destination,
    get_fs,
    is_local,
    join,
    local_path,
    parse_rank_folder,
    scan_folder,
)
from ckptcore.errors import CkptError
from tasks.retry import storage_retries


@dataclass(frozen=True)
class Pending:
    """One checkpoint to convert: its URL (``<folder>/<name>.ckpt``) and its destination."""

    checkpoint_url: str
    destination: str


def _training_folders(prefix: str) -> list[str]:
    """Folders under ``prefix`` that hold ``.ckpt`` files (directly or in rank folders)."""
    fs, root = get_fs(prefix)
    if not fs.exists(root):
        raise CkptError(prefix, "training prefix not found")
    folders = set()
    for path in fs.find(root, withdirs=False):
        if not path.endswith(".ckpt"):
            continue
        parent = path.rsplit("/", 1)[0]
        if parse_rank_folder(parent.rsplit("/", 1)[-1]) is not None:
            parent = parent.rsplit("/", 1)[0]
        folders.add(parent)
    base = root.rstrip("/")
    return sorted(
        join(prefix.rstrip("/"), f[len(base) + 1 :]) if f != base else prefix.rstrip("/")
        for f in folders
    )


def destination_for(
    folder: str, name: str, training_prefix: str, destination_prefix: str | None
) -> str:
    """``<destination_prefix>/<folder relative to the prefix>/<stem>.nemo``, or the default
    ``<folder>/nemo/<stem>.nemo`` (what a triggered ``convert`` run picks too)."""
    if not destination_prefix:
        return default_destination(SourceListing(folder, "ptl", name, ()))
    rel = folder[len(training_prefix.rstrip("/")) :].strip("/")
    stem = name[: -len(".ckpt")]
    return (
        join(destination_prefix, rel, f"{stem}.nemo")
        if rel
        else join(destination_prefix, f"{stem}.nemo")
    )


def find_pending(training_prefix: str, destination_prefix: str | None = None) -> list[Pending]:
    """Every finished checkpoint under ``training_prefix`` whose destination has no sidecar."""
    if is_local(training_prefix):
        training_prefix = os.path.abspath(local_path(training_prefix))
    pending = []
    for folder in _training_folders(training_prefix):
        found, unfinished = scan_folder(folder)
        for name in sorted(found):
            if name[: -len(".ckpt")] in unfinished:
                continue
            dest = destination_for(folder, name, training_prefix, destination_prefix)
            fs, sidecar = get_fs(lineage.sidecar_url(dest))
            if fs.exists(sidecar):
                continue
            pending.append(Pending(join(folder, name), dest))
    return pending


@task(
    name="find-unconverted",
    **storage_retries(),
)
def find_unconverted(training_prefix: str, destination_prefix: str | None = None) -> list[Pending]:
    """List the training prefix; return the finished checkpoints without a lineage record."""
    return find_pending(training_prefix, destination_prefix)
