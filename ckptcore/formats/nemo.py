"""The ``.nemo`` archive: an uncompressed tar of ``model_config.yaml`` plus per-rank weights.

Reading indexes the tar's members without extracting them: a plain tar's member data are byte
ranges of the file, so each rank's ``model_weights.ckpt`` is read in place (mmap locally, ranged
reads remotely). Gzip tars (NeMo <= 1.6) are unpacked into a temporary folder first, with limits.
Members that could escape a folder (absolute paths, ``..``, links, devices) are refused.

Writing lays the archive out exactly as NeMo's ``save_to`` does: first member ``./``, names
prefixed ``./``, sorted, directories before their files, uncompressed.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import yaml

from ckptcore import settings
from ckptcore.errors import CkptError
from ckptcore.formats.safe_pickle import to_plain
from ckptcore.storage import ByteSource, SubRange

CONFIG_NAME = "model_config.yaml"
MAX_CONFIG_BYTES = 16 << 20
MAX_GZIP_RATIO = 50  # a gzip .nemo may not expand more than this...
MAX_GZIP_FLOOR = 1 << 30  # ...beyond this many bytes


class _SourceReader(io.RawIOBase):
    """A seekable file object over a ByteSource, for tarfile's header walk."""

    def __init__(self, src: ByteSource) -> None:
        self.src = src
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.src.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = max(0, min(len(buf), self.src.size - self.pos))
        if n:
            buf[:n] = self.src.read(self.pos, n)
        self.pos += n
        return n


@dataclass(frozen=True)
class Member:
    name: str  # normalised: no leading ./
    offset: int
    size: int


def normalise_member(name: str, archive: str) -> str:
    """A member name relative to the archive root; refuses names that would leave it."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise CkptError(archive, f"unsafe member {name!r}: absolute path")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise CkptError(archive, f"unsafe member {name!r}: path escapes the archive")
    return "/".join(parts)


def _check_member(info: tarfile.TarInfo, archive: str) -> str:
    rel = normalise_member(info.name, archive)
    if info.issym() or info.islnk():
        raise CkptError(archive, f"unsafe member {info.name!r}: links are not allowed")
    if not (info.isfile() or info.isdir()):
        raise CkptError(archive, f"unsafe member {info.name!r}: device or special file")
    return rel


def index_tar(src: ByteSource) -> dict[str, Member]:
    """Members of an uncompressed tar (regular files only), checked for safety."""
    members: dict[str, Member] = {}
    try:
        with tarfile.open(fileobj=_SourceReader(src), mode="r:") as tar:
            for info in tar:
                rel = _check_member(info, src.name)
                if info.isdir():
                    continue
                if rel in members:
                    raise CkptError(src.name, f"archive has two members named {rel}")
                if info.offset_data + info.size > src.size:
                    raise CkptError(src.name, f"truncated archive: member {rel} runs past the end")
                members[rel] = Member(rel, info.offset_data, info.size)
            check_end(tar, src.name)
    except tarfile.TarError as exc:
        raise CkptError(src.name, f"not a valid .nemo (tar) archive: {exc}") from None
    return members


def check_end(tar: tarfile.TarFile, archive: str) -> None:
    """After the last member, a tar has its end-of-archive marker (zero blocks). tarfile stops
    silently at a cut or damaged header; a truncated archive must not pass as a shorter one."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not any(block):
        return
    if not block:
        raise CkptError(
            archive, f"truncated archive: no end-of-archive marker at byte {tar.offset}"
        )
    if len(block) < tarfile.BLOCKSIZE:
        raise CkptError(
            archive, f"truncated archive: it ends inside the member header at byte {tar.offset}"
        )
    raise CkptError(archive, f"damaged archive: invalid member header at byte {tar.offset}")


def is_gzip(src: ByteSource) -> bool:
    return src.size >= 2 and bytes(src.read(0, 2)) == b"\x1f\x8b"


def extract_gzip_tar(src: ByteSource, dest: str) -> None:
    """Unpack a gzip ``.nemo`` (NeMo <= 1.6) into ``dest`` safely, bounding its expansion."""
    limit = max(MAX_GZIP_FLOOR, src.size * MAX_GZIP_RATIO)
    total = 0
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=_SourceReader(src), mode="r:gz") as tar:
            for info in tar:
                rel = _check_member(info, src.name)
                target = os.path.join(dest, rel)
                if info.isdir():
                    os.makedirs(target, exist_ok=True)
                    continue
                if rel in seen:
                    raise CkptError(src.name, f"archive has two members named {rel}")
                seen.add(rel)
                total += info.size
                if total > limit:
                    raise CkptError(
                        src.name, f"gzip archive expands beyond {limit} bytes (a gzip bomb?)"
                    )
                os.makedirs(os.path.dirname(target) or dest, exist_ok=True)
                fobj = tar.extractfile(info)
                if fobj is None:
                    raise CkptError(src.name, f"cannot read member {rel}")
                with fobj, open(target, "wb") as out:
                    shutil.copyfileobj(fobj, out, 8 << 20)
            check_end(tar, src.name)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if (
            isinstance(exc, OSError)
            and not isinstance(exc, tarfile.TarError | EOFError)
            and exc.errno
        ):  # writing the unpacked files failed (a full disk)
            raise CkptError(
                src.name, f"cannot unpack the gzip archive into {dest}: {exc.strerror}"
            ) from None
        raise CkptError(src.name, f"not a valid gzip .nemo archive: {exc}") from None


def parse_config(data: bytes, path: str) -> dict:
    """``model_config.yaml`` as a plain dict (a top-level ``model:`` wrapper is unwrapped)."""
    if len(data) > MAX_CONFIG_BYTES:
        raise CkptError(path, "model_config.yaml is too large")
    try:
        cfg = yaml.safe_load(bytes(data).decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CkptError(path, f"model_config.yaml is not valid YAML: {first}") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "hidden_size" not in cfg:
        cfg = cfg["model"]
    if not isinstance(cfg, dict):
        raise CkptError(path, "model_config.yaml does not hold a mapping")
    return to_plain(cfg, path, CONFIG_NAME)


def dump_config(config: dict) -> bytes:
    """YAML as NeMo writes it (OmegaConf's style: block lists, ``1.0e-05`` floats)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config)).encode("utf-8")


def member_source(src: ByteSource, member: Member, archive: str) -> ByteSource:
    return SubRange(src, member.offset, member.size, f"{archive}:{member.name}")


# ---------------------------------------------------------------------------------------------
# Writing


def _tar_info(name: str, size: int, is_dir: bool, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = (0o700 if name == "." else 0o755) if is_dir else 0o644
    info.mtime = mtime
    info.uname = info.gname = ""
    return info


@dataclass
class MemberSource:
    """A member produced on the fly: ``write(sink)`` must emit exactly ``size`` bytes."""

    size: int
    write: Callable[[Callable[[bytes | memoryview], object]], object]


MemberData = str | bytes | MemberSource  # a local path, the bytes, or a producer


TRAILER = "lineage.json"  # a record of how the archive was made: written after the model


def nemo_members(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """Archive members in NeMo's order: ``.``, then a sorted walk, each folder before its files;
    a top-level :data:`TRAILER` comes last, so the model's bytes never move with its size.

    Returns (member name, relative file name or None for a folder).
    """
    tree: dict[str, list[str]] = {"": []}
    for rel in names:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent, child = "/".join(parts[: i - 1]), "/".join(parts[:i])
            if child not in tree:
                tree[child] = []
                tree[parent].append(child)
        tree["/".join(parts[:-1])].append(rel)
    out: list[tuple[str, str | None]] = [(".", None)]

    def walk(folder: str) -> None:
        for child in sorted(tree[folder], key=posixpath.basename):
            if child in tree:
                out.append((f"./{child}", None))
                walk(child)
            else:
                out.append((f"./{child}", child))

    walk("")
    trailer = [m for m in out if m[1] == TRAILER]
    return [m for m in out if m[1] != TRAILER] + trailer


def _size_of(data: MemberData) -> int:
    if isinstance(data, MemberSource):
        return data.size
    if isinstance(data, bytes):
        return len(data)
    return os.path.getsize(data)


FIXED_MTIME = 315532800  # 1980-01-01, the reproducible-builds default (zip cannot go earlier)


def default_mtime() -> int:
    """Member times of written archives: ``SOURCE_DATE_EPOCH`` if set, else a fixed date.

    Never the clock: the same input then gives the same bytes (a rerun after a crash, a cache
    keyed by sha256, two conversions compared with ``cmp``).
    """
    epoch = settings.current().source_date_epoch
    return FIXED_MTIME if epoch is None else epoch


@dataclass(frozen=True)
class Placement:
    """One member's place in an archive: its tar header at ``offset``, then ``size`` data
    bytes, then zeros to the next 512-byte block."""

    name: str  # the member name in the archive ("./tp_rank_00_pp_rank_000/model_weights.ckpt")
    rel: str | None  # the file's key in ``files``; None for a folder
    offset: int
    header: bytes
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + len(self.header)

    @property
    def end(self) -> int:
        return self.data_offset + self.size + (-self.size) % tarfile.BLOCKSIZE


def archive_layout(sizes: dict[str, int], mtime: int | None = None) -> tuple[list[Placement], int]:
    """Where every member of the archive :func:`write_nemo` writes for files of these sizes
    lies, and the archive's total size (its end blocks included): the sizes alone fix every
    byte's place, so members can be written independently, by different processes, into a
    file of that size (:func:`write_member_at`), and the result is the same archive."""
    mtime = default_mtime() if mtime is None else mtime
    placements, offset = [], 0
    for name, rel in nemo_members(sizes):
        size = 0 if rel is None else sizes[rel]
        header = _tar_info(name, size, rel is None, mtime).tobuf(
            tarfile.PAX_FORMAT, "utf-8", "surrogateescape"
        )
        placement = Placement(name, rel, offset, header, size)
        placements.append(placement)
        offset = placement.end
    end = 2 * tarfile.BLOCKSIZE
    end += (-(offset + end)) % tarfile.RECORDSIZE
    return placements, offset + end


def _emit_data(emit: Callable[[bytes | memoryview], object], data: MemberData) -> None:
    """A member's data to ``emit``: the bytes, the producer's output, or the file's content."""
    if isinstance(data, bytes):
        emit(data)
    elif isinstance(data, MemberSource):
        data.write(emit)
    else:
        with open(data, "rb") as f:
            while block := f.read(8 << 20):
                emit(block)


def write_member_at(
    fd: int,
    placement: Placement,
    data: MemberData,
    base: int = 0,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Write one member (header and data) at its place in the archive open as ``fd``, a file
    already of the archive's size (zeros where nothing is written yet: the padding and the
    end blocks need no writing). ``base``: the archive offset ``fd`` starts at (a file that
    holds only a piece of the archive). ``progress``: told the file offset written up to after
    each chunk."""
    position = placement.offset - base

    def emit(chunk: bytes | memoryview) -> None:
        nonlocal position
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, position)
            position += n
            view = view[n:]
        if progress is not None:
            progress(position)

    emit(placement.header)
    _emit_data(emit, data)
    produced = position + base - placement.data_offset
    if produced != placement.size:
        raise CkptError(
            placement.name, f"member produced {produced} bytes, expected {placement.size}"
        )


def write_nemo(out, files: dict[str, MemberData], mtime: int | None = None) -> int:
    """Write the archive sequentially to ``out`` (a binary file object or a sink callable).

    Every member's size is known up front, so headers precede data and nothing is revisited:
    the output can be a pipe or a multipart upload as well as a file.
    """
    sink = out if callable(out) and not hasattr(out, "write") else out.write
    mtime = default_mtime() if mtime is None else mtime
    written = 0

    def emit(data: bytes | memoryview) -> None:
        nonlocal written
        sink(data)
        written += len(data)

    copier = getattr(sink, "copy_range", None)
    if copier is not None:  # a file: members' file ranges are copied by the kernel

        def copy_range(fd: int, offset: int, length: int) -> None:
            nonlocal written
            copier(fd, offset, length)
            written += length

        emit.copy_range = copy_range  # type: ignore[attr-defined]
    if hasattr(sink, "reserve"):  # a file: a member's disk blocks are allocated up front
        emit.reserve = sink.reserve  # type: ignore[attr-defined]

    placements, total = archive_layout({rel: _size_of(d) for rel, d in files.items()}, mtime)
    for placement in placements:
        emit(placement.header)
        if placement.rel is None:
            continue
        data, size = files[placement.rel], placement.size
        before = written
        _emit_data(emit, data)
        if written - before != size:
            raise CkptError(
                placement.name, f"member produced {written - before} bytes, expected {size}"
            )
        pad = (-size) % tarfile.BLOCKSIZE
        if pad:
            emit(b"\0" * pad)
    emit(b"\0" * (total - written))
    return written


def stage_dir(prefix: str = "ckpt-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def rank_weight_members(members: Iterable[str]) -> list[str]:
    return sorted(m for m in members if posixpath.basename(m) == "model_weights.ckpt")
