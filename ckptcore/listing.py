"""Source checkpoints: list their files, then read them where they are or fetch them.

:func:`describe_source` names every file of one checkpoint with its size and a content
identity (the ETag of an object, the sha256 of a local file). :func:`locate_checkpoint` reads
a remote source where it is (later steps fetch only the byte ranges they need, into a range
cache); :func:`fetch_checkpoint` downloads every remote file, hashing as it goes. A local
source is always used in place. :func:`check_unchanged` asks the store again after reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ckptcore import lineage
from ckptcore.errors import CkptError
from ckptcore.formats.nemo import CONFIG_NAME
from ckptcore.formats.ptl import find_checkpoint
from ckptcore.layout import parse_rank_folder
from ckptcore.storage import etag_of, forget_listings, get_fs, is_local, join, local_path


class Meter(Protocol):
    """Progress of one long step: bytes done, then finished."""

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


MeterFactory = Callable[[str, int], Meter]  # (title, total bytes) -> a meter


class NullMeter:
    """No progress shown."""

    def __init__(self, title: str = "", total: int = 0) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


CHUNK_BYTES = 8 << 20
FETCH_MANIFEST = ".fetched.json"
COMMUNITY_CONFIG = "config.json"  # transformers / timm folders


@dataclass(frozen=True)
class ListedFile:
    """One source file: URL, path relative to the source root, size, content identity."""

    url: str
    rel: str
    size_bytes: int
    etag: str | None = None  # object storage
    sha256: str | None = None  # local files (hashed while listing)


@dataclass(frozen=True)
class SourceListing:
    """The files of one checkpoint, before anything is downloaded."""

    root: str  # training folder, .nemo file or extracted .nemo folder
    kind: str  # ptl | nemo | nemo-dir | community
    checkpoint: str | None  # file name of a Lightning checkpoint
    files: tuple[ListedFile, ...]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def local(self) -> bool:
        return is_local(self.root)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def content_key(self) -> str:
        """Digest of what the files are (names, sizes, ETags or sha256), not where they are."""
        rows = sorted((f.rel, f.size_bytes, f.etag or "", f.sha256 or "") for f in self.files)
        blob = json.dumps([self.kind, self.checkpoint, rows]).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class FetchedCheckpoint:
    """Where later steps read a checkpoint: local disk (a local source, or one downloaded with
    every file's sha256), or the object storage it is in (read in place, files by ETag)."""

    source: str
    kind: str
    checkpoint: str | None
    local_root: str  # the source itself when read in place (a URL for object storage)
    files: tuple[lineage.SourceFile, ...]
    rels: tuple[str, ...]
    digest: str
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())
    cache_dir: str | None = None  # range cache of a source read in place from object storage

    @property
    def open_url(self) -> str:
        """What ``open_checkpoint`` and ``verify`` open: for a training folder, one rank file
        of the chosen checkpoint (so the choice survives without a ``checkpoint`` argument)."""
        if self.kind == "ptl":
            return join(self.local_root, sorted(self.rels)[0])
        return self.local_root

    @property
    def in_place(self) -> bool:
        """Read where it is in object storage (nothing downloaded)."""
        return not is_local(self.local_root)

    def content_key(self) -> str:
        return hashlib.sha256(f"{self.kind}\t{self.checkpoint}\t{self.digest}".encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_checkpoint_url(source: str, checkpoint: str = "last") -> tuple[str, str]:
    """``.../checkpoints/[mp_rank_00/]<name>.ckpt`` -> (training folder, name); else as given.

    A training job can then name one checkpoint by one URL, whatever its TP/PP.
    """
    source = source.rstrip("/")
    if not source.endswith(".ckpt"):
        return source, checkpoint
    folder, name = source.rsplit("/", 1) if "/" in source else (".", source)
    if parse_rank_folder(folder.rsplit("/", 1)[-1]) is not None:
        folder = folder.rsplit("/", 1)[0] if "/" in folder else "."
    return folder, name


def default_destination(listing: SourceListing) -> str:
    """Where a conversion goes when no destination is named: ``<folder>/nemo/<stem>.nemo``.

    The sweep and the training-event trigger both use it, so each finds the other's output.
    """
    if listing.kind == "ptl" and listing.checkpoint:
        stem = listing.checkpoint[: -len(".ckpt")]
        return join(listing.root, "nemo", f"{stem}.nemo")
    base = listing.root.rstrip("/")
    return base[: -len(".nemo")] + "-resharded.nemo" if base.endswith(".nemo") else base + ".nemo"


def _sha256_local(path: str, meter: Meter) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            meter.advance(len(chunk))
    return h.hexdigest()


def describe_source(
    source: str, checkpoint: str = "last", progress: MeterFactory | None = None
) -> SourceListing:
    """Every file of one checkpoint (a Lightning training folder, or the URL of one checkpoint
    in it; a ``.nemo``; an extracted ``.nemo`` folder; a community folder) with its size and
    content identity: the ETag of an object, the sha256 of a local file (hashed here,
    ``progress`` told of it)."""
    progress = progress or NullMeter
    start = time.perf_counter()
    root, checkpoint = split_checkpoint_url(source, checkpoint or "last")
    if is_local(root):
        root = os.path.abspath(local_path(root))
    fs, path = get_fs(root)
    forget_listings(root)  # list what is there now, not what this process saw before
    try:
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    except FileNotFoundError:
        exists = is_dir = False
    if not exists:
        raise CkptError(root, "not found")
    notes: tuple[str, ...] = ()
    name: str | None = None
    nemo_dir = is_dir and fs.exists(path.rstrip("/") + "/" + CONFIG_NAME)
    if nemo_dir or (is_dir and fs.exists(path.rstrip("/") + "/" + COMMUNITY_CONFIG)):
        kind = "nemo-dir" if nemo_dir else "community"
        found = fs.find(path, withdirs=False, detail=True)
        base = path.rstrip("/") + "/"
        entries = [
            (join(root, p[len(base) :]), p[len(base) :], int(info.get("size") or 0))
            for p, info in sorted(found.items())
        ]
    elif is_dir:
        kind = "ptl"
        ptl = find_checkpoint(root, checkpoint)
        name = ptl.name
        notes = tuple(ptl.notes)
        entries = []
        for url in sorted(ptl.files.values()):
            entries.append((url, url[len(root.rstrip("/")) + 1 :], int(ptl.sizes[url])))
    else:
        kind = "nemo"
        entries = [(root, root.rsplit("/", 1)[-1], int(fs.size(path)))]
    files = []
    local_bytes = sum(size for url, _, size in entries if is_local(url))
    meter = progress(f"sha256 of {root}", local_bytes)
    for url, rel, size in entries:
        if is_local(url):
            files.append(ListedFile(url, rel, size, sha256=_sha256_local(url, meter)))
        else:
            info = fs.info(get_fs(url)[1])
            etag = etag_of(info)
            files.append(ListedFile(url, rel, int(info.get("size") or size), etag=etag))
    if local_bytes:
        meter.finish()
    return SourceListing(root, kind, name, tuple(files), notes, time.perf_counter() - start)


def fetch_location(listing: SourceListing, work_dir: str) -> str:
    return os.path.join(work_dir, f"fetch-{listing.content_key()[:24]}")


def _read_manifest(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, FETCH_MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fetched_is_present(fetched: FetchedCheckpoint) -> bool:
    """Are the fetched files still on this machine's disk (a cached result may predate it)?"""
    if fetched.kind == "nemo":
        return os.path.isfile(fetched.local_root)
    return all(os.path.isfile(os.path.join(fetched.local_root, rel)) for rel in fetched.rels)


def _download(url: str, dest: str, size: int, meter: Meter) -> str:
    """Copy one object to ``dest`` (via ``dest.part``), hashing it; returns the sha256."""
    fs, path = get_fs(url)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".part"
    h = hashlib.sha256()
    got = 0
    with fs.open(path, "rb", block_size=CHUNK_BYTES) as src, open(tmp, "wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            h.update(chunk)
            out.write(chunk)
            got += len(chunk)
            meter.advance(len(chunk))
    if got != size:
        os.unlink(tmp)
        raise CkptError(url, f"changed while being fetched: listed {size} bytes, read {got}")
    os.replace(tmp, dest)
    return h.hexdigest()


def cache_location(listing: SourceListing, work_dir: str) -> str:
    """The range cache of a source read in place (removed with the run's work files)."""
    return os.path.join(work_dir, f"cache-{listing.content_key()[:24]}")


def locate_checkpoint(listing: SourceListing, work_dir: str) -> FetchedCheckpoint:
    """The source where it is: nothing is read here. Files are identified as listed (sha256 of
    a local file, ETag of an object); a remote source gets a range cache in the work folder."""
    files = tuple(lineage.SourceFile(f.url, f.size_bytes, f.sha256, f.etag) for f in listing.files)
    return FetchedCheckpoint(
        source=listing.root,
        kind=listing.kind,
        checkpoint=listing.checkpoint,
        local_root=local_path(listing.root) if listing.local else listing.root,
        files=files,
        rels=tuple(f.rel for f in listing.files),
        digest=lineage.files_digest(list(files)),
        seconds=0.0,
        notes=listing.notes,
        cache_dir=None if listing.local else cache_location(listing, work_dir),
    )


def changed_since_listed(url: str, size: int, etag: str | None) -> str | None:
    """What changed about ``url`` since it was listed with ``size`` and ``etag`` (None: that
    ETag is not checked), asked of the store, not of a listing this process cached; None if
    nothing did."""
    fs, path = get_fs(url)
    forget_listings(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return "disappeared"
    if int(info.get("size") or 0) != size:
        return "changed (new size)"
    if etag and etag_of(info) != etag:
        return "changed (new ETag)"
    return None


def check_unchanged(fetched: FetchedCheckpoint) -> None:
    """Fail when a source object changed (size or ETag) since it was listed: a conversion
    that read it in place may have mixed old and new bytes."""
    for f in fetched.files:
        if is_local(f.url) or not f.etag:
            continue
        problem = changed_since_listed(f.url, f.size_bytes, f.etag)
        if problem:
            raise CkptError(f.url, f"{problem} while being read; start the run again")


def fetch_checkpoint(
    listing: SourceListing, work_dir: str, progress: MeterFactory | None = None
) -> FetchedCheckpoint:
    """Remote files -> ``<work_dir>/fetch-<content key>/``, each hashed as it comes; a local
    source stays where it is. Files already fetched (the folder's manifest names the same
    content) are not fetched again."""
    progress = progress or NullMeter
    start = time.perf_counter()
    if listing.local:
        return locate_checkpoint(listing, work_dir)
    folder = fetch_location(listing, work_dir)
    manifest = _read_manifest(folder)
    if not (manifest and manifest.get("content_key") == listing.content_key()):
        os.makedirs(folder, exist_ok=True)
        meter = progress(f"fetch {listing.root}", listing.size_bytes)
        digests = {}
        for f in listing.files:
            digests[f.rel] = _download(f.url, os.path.join(folder, f.rel), f.size_bytes, meter)
        meter.finish()
        manifest = {"content_key": listing.content_key(), "sha256": digests}
        tmp = os.path.join(folder, FETCH_MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(manifest, out, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(folder, FETCH_MANIFEST))
    files = tuple(
        lineage.SourceFile(f.url, f.size_bytes, manifest["sha256"][f.rel], f.etag)
        for f in listing.files
    )
    local_root = folder
    if listing.kind == "nemo":
        local_root = os.path.join(folder, listing.files[0].rel)
    return FetchedCheckpoint(
        source=listing.root,
        kind=listing.kind,
        checkpoint=listing.checkpoint,
        local_root=local_root,
        files=files,
        rels=tuple(f.rel for f in listing.files),
        digest=lineage.files_digest(list(files)),
        seconds=time.perf_counter() - start,
        notes=listing.notes,
    )
