"""Open any supported checkpoint as ranks of lazily read tensors.

``open_checkpoint(url)`` accepts a ``.nemo`` file (plain or gzip tar), an extracted ``.nemo``
folder, a PyTorch Lightning training folder (or one ``.ckpt`` in it), local or fsspec URLs.
Every source becomes a :class:`Checkpoint`: a model config plus, per (tp_rank, pp_rank), an
ordered state dict whose values are :class:`TensorRef` (not read yet) or ``None``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ckptcore.errors import CkptError, StorageError, storage_error
from ckptcore.formats import nemo as nemo_fmt
from ckptcore.formats.ptl import PtlCheckpoint, find_checkpoint
from ckptcore.formats.safe_pickle import TensorRef, to_plain
from ckptcore.formats.torchzip import TensorSpec, TorchFile, state_dict_of
from ckptcore.layout import parse_rank_folder, rank_folder
from ckptcore.storage import (
    ByteSource,
    LocalFile,
    RangeCache,
    Span,
    get_fs,
    is_local,
    local_path,
    open_source,
)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor computed on demand (e.g. mapped from a community checkpoint): spec now, bytes later."""

    dtype: Any  # a DTypeName or a torch dtype
    shape: tuple[int, ...]
    load: Callable[[], Any] = field(compare=False, repr=False)


Value = Any  # TensorRef | LazyTensor | torch.Tensor | None


def is_tensor(value: Any) -> bool:
    """A torch tensor (without importing torch: in-memory sources hold them, file sources don't)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "untyped_storage")


def spec_of(value: Value) -> TensorSpec | None:
    if value is None:
        return None
    return TensorSpec(value.dtype, tuple(value.shape))


@dataclass
class SourceRank:
    tp_rank: int
    pp_rank: int
    name: str
    state: collections.OrderedDict  # key -> Value
    metadata: dict | None
    reader: Callable[[TensorRef], Any] | None = None
    span_reader: Callable[[TensorRef], Span] | None = None
    notes: list[str] = field(default_factory=list)  # about how its file is read

    def span(self, key: str) -> Span | None:
        """Where a stored contiguous tensor's bytes are, or None where only :meth:`tensor` works."""
        value = self.state[key]
        if isinstance(value, TensorRef) and self.span_reader is not None and value.is_contiguous():
            return self.span_reader(value)
        return None

    def tensor(self, key: str) -> Any:
        value = self.state[key]
        if is_tensor(value):
            return value
        if isinstance(value, LazyTensor):
            t = value.load()
            if t.dtype != value.dtype or tuple(t.shape) != value.shape:
                raise CkptError(
                    self.name,
                    f"produced {t.dtype} {tuple(t.shape)}, declared {value.dtype} {value.shape}",
                    key,
                )
            return t
        if value is None or self.reader is None:
            raise CkptError(self.name, "has no tensor data", key)
        return self.reader(value)


@dataclass
class Checkpoint:
    url: str
    kind: str  # nemo | nemo-dir | ptl | memory | hf | timm
    config: dict
    tp: int
    pp: int
    ranks: dict[tuple[int, int], SourceRank]
    step: int | None = None
    epoch: int | None = None
    files: list[tuple[str, int]] = field(default_factory=list)  # (url, size) of every source file
    notes: list[str] = field(default_factory=list)
    name: str | None = None
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        for fn in self._cleanup:
            fn()
        self._cleanup.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_state_dicts(
        cls, config: dict, shards: dict[tuple[int, int], dict[str, Any]], url: str = "<memory>"
    ) -> Checkpoint:
        tp = max(t for t, _ in shards) + 1
        pp = max(p for _, p in shards) + 1
        ranks = {
            r: SourceRank(
                r[0],
                r[1],
                f"{url}[tp={r[0]},pp={r[1]}]",
                collections.OrderedDict(sd),
                getattr(sd, "_metadata", None),
            )
            for r, sd in shards.items()
        }
        return cls(url, "memory", dict(config), tp, pp, ranks)


class GuardedSource:
    """A remote :class:`ByteSource` whose storage failures name the file: a read that fails is a
    ``StorageError`` (or ``CkptError`` for a vanished object), never a raw client exception.
    Everything else (``plan_reads``, counters) is the wrapped source's."""

    def __init__(self, src: ByteSource) -> None:
        self._src = src
        self.name = src.name
        self.size = src.size

    def read(self, offset: int, length: int) -> bytes | memoryview:
        try:
            return self._src.read(offset, length)
        except (CkptError, StorageError):
            raise
        except Exception as exc:
            raise storage_error(self.name, _reading(offset, length), exc) from exc

    def readinto(self, offset: int, buf: memoryview) -> None:
        try:
            self._src.readinto(offset, buf)
        except (CkptError, StorageError):
            raise
        except Exception as exc:
            raise storage_error(self.name, _reading(offset, len(buf)), exc) from exc

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        try:
            return self._src.read_ranges(ranges)  # type: ignore[attr-defined]
        except (CkptError, StorageError):
            raise
        except Exception as exc:
            first = ranges[0] if ranges else (0, 0)
            raise storage_error(self.name, _reading(*first), exc) from exc

    def close(self) -> None:
        self._src.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._src, name)


def _reading(offset: int, length: int) -> str:
    return f"reading bytes {offset}..{offset + length} failed"


def open_guarded(url: str, cache: RangeCache | None = None) -> ByteSource:
    """:func:`~ckptcore.storage.open_source`, remote failures (opening included) named."""
    if is_local(url):
        return open_source(url)
    try:
        return GuardedSource(open_source(url, cache))
    except (CkptError, StorageError):
        raise
    except Exception as exc:
        raise storage_error(url, "cannot open", exc) from exc


def torch_rank(src: ByteSource, tp_rank: int, pp_rank: int) -> SourceRank:
    """One rank file (torch's zip format) read lazily: its keys and specs now, tensors on demand."""
    return _torch_rank(src, tp_rank, pp_rank)[0]


_LOCATE_AHEAD: ContextVar[bool] = ContextVar("ckpt_locate_ahead", default=True)


@contextlib.contextmanager
def headers_only() -> Iterator[None]:
    """Checkpoints opened inside read their zip directories and pickles (names, dtypes, shapes:
    enough to plan) but not every record's local header ahead of time, which for a source in
    object storage costs a few MB of ranged reads; a record's place asked for later costs a
    request of its own."""
    token = _LOCATE_AHEAD.set(False)
    try:
        yield
    finally:
        _LOCATE_AHEAD.reset(token)


def _torch_rank(
    src: ByteSource, tp_rank: int, pp_rank: int, locate: bool | None = None
) -> tuple[SourceRank, Any]:
    tf = TorchFile(src)
    sd = state_dict_of(tf.obj, src.name)
    if _LOCATE_AHEAD.get() if locate is None else locate:
        tf.locate([v for v in sd.values() if isinstance(v, TensorRef)])
    meta = _check_metadata(getattr(sd, "_metadata", None), src.name)
    return SourceRank(tp_rank, pp_rank, src.name, sd, meta, tf.tensor, tf.span, tf.notes), tf.obj


def _open_ranks(
    files: list[tuple[tuple[int, int], str]], cache: RangeCache | None
) -> list[tuple[ByteSource, SourceRank, Any]]:
    """Open each rank file (zip directory, pickle, local headers). Objects in remote storage
    are opened concurrently: each takes a few round trips, which then overlap; the first
    failure in rank order is raised, with every file opened so far closed again."""

    locate = _LOCATE_AHEAD.get()  # the pool's threads do not see this context

    def one(item: tuple[tuple[int, int], str]) -> tuple[ByteSource, SourceRank, Any]:
        rank, url = item
        src = open_guarded(url, cache)
        try:
            return (src, *_torch_rank(src, *rank, locate=locate))
        except BaseException:
            src.close()
            raise

    if len(files) == 1 or all(is_local(url) for _, url in files):
        opened: list[tuple[ByteSource, SourceRank, Any]] = []
        try:
            for item in files:
                opened.append(one(item))
        except BaseException:
            _close_all(src for src, _, _ in opened)
            raise
        return opened
    with ThreadPoolExecutor(min(8, len(files)), thread_name_prefix="ckpt-open") as pool:
        futures = [pool.submit(one, item) for item in files]
        wait(futures)
    failed = next((f for f in futures if f.exception() is not None), None)
    if failed is not None:
        _close_all(f.result()[0] for f in futures if f.exception() is None)
        failed.result()  # raises it
    return [f.result() for f in futures]


def _close_all(sources: Iterable[ByteSource]) -> None:
    for src in sources:
        src.close()


def _check_metadata(meta: Any, path: str) -> dict | None:
    """``state_dict._metadata`` as torch writes it: {module prefix: {"version": 1, ...}}."""
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in meta.items()
    ):
        raise CkptError(path, "the state dict's _metadata is not a mapping of mappings")
    for prefix, value in meta.items():
        for k, v in value.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, bool | int | float | str)):
                raise CkptError(
                    path, f"the state dict's _metadata holds {k!r:.40}: {type(v).__name__}", prefix
                )
    return meta


def _config_parallel(config: dict) -> tuple[int, int]:
    def as_int(v: Any) -> int:
        try:
            return int(v) if v not in (None, "") else 1
        except (TypeError, ValueError):
            return -1

    return as_int(config.get("tensor_model_parallel_size")), as_int(
        config.get("pipeline_model_parallel_size")
    )


def _check_layout(path: str, config: dict, tp: int, pp: int, what: str, present=None) -> None:
    ctp, cpp = _config_parallel(config)
    if present is not None and ctp > 0 and cpp > 0:
        expected = {(t, p) for p in range(cpp) for t in range(ctp)}
        missing = sorted(expected - set(present), key=lambda r: (r[1], r[0]))
        if missing and set(present) <= expected:
            names = ", ".join(
                rank_folder(t, p, ctp, cpp) or "model_weights.ckpt" for t, p in missing
            )
            raise CkptError(path, f"missing rank(s) {names} of TP={ctp} PP={cpp} (per the config)")
    if (ctp, cpp) != (tp, pp):
        raise CkptError(
            path,
            f"config says TP={ctp} PP={cpp} but the {what} hold TP={tp} PP={pp}",
        )


def open_checkpoint(
    url: str, checkpoint: str = "last", cache: RangeCache | str | None = None
) -> Checkpoint:
    """Open a ``.nemo`` (file or folder) or a Lightning training folder/file for lazy reading.

    ``cache``: a :class:`~ckptcore.storage.RangeCache` (or its folder) that keeps the byte
    ranges read from object storage, so opening the same objects again reads them locally.
    """
    if isinstance(cache, str):
        cache = RangeCache(cache)
    fs, path = get_fs(url)
    try:
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    except ValueError as exc:
        raise CkptError(url, f"cannot access: {exc}") from None
    except Exception as exc:
        raise storage_error(url, "cannot access", exc) from exc
    if not exists:
        raise CkptError(url, "not found")
    if is_dir:
        if fs.exists(path.rstrip("/") + "/" + nemo_fmt.CONFIG_NAME):
            return _open_nemo_dir(url, cache=cache)
        return _open_ptl(url, checkpoint, cache)
    if url.endswith(".ckpt"):
        parent, name = url.rstrip("/").rsplit("/", 1) if "/" in url else (".", url)
        if parse_rank_folder(parent.rstrip("/").rsplit("/", 1)[-1]) is not None:
            parent = parent.rstrip("/").rsplit("/", 1)[0] if "/" in parent else "."
        return _open_ptl(parent, name, cache)
    return _open_nemo_file(url, cache)


def _open_ptl(folder: str, checkpoint: str, cache: RangeCache | None = None) -> Checkpoint:
    found = find_checkpoint(folder, checkpoint)
    opened = _open_ranks(sorted(found.files.items()), cache)
    return _owning([src for src, _, _ in opened], lambda: _assemble_ptl(folder, found, opened))


def _owning(sources: list[ByteSource], build: Callable[[], Checkpoint]) -> Checkpoint:
    """``build()``'s checkpoint, which closes ``sources`` when closed (closed here at once
    where building fails)."""
    try:
        ck = build()
    except BaseException:
        _close_all(sources)
        raise
    ck._cleanup.extend(src.close for src in sources)
    return ck


def _assemble_ptl(
    folder: str, found: PtlCheckpoint, opened: list[tuple[ByteSource, SourceRank, Any]]
) -> Checkpoint:
    ranks: dict[tuple[int, int], SourceRank] = {}
    steps: dict[str, Any] = {}
    config: dict | None = None
    epoch = None
    for (rank, url), (_, sr, obj) in zip(sorted(found.files.items()), opened, strict=True):
        if not isinstance(obj, dict) or "state_dict" not in obj:
            raise CkptError(url, "not a Lightning checkpoint (no state_dict)")
        cfg = training_config(obj.get("hyper_parameters"), url)
        if config is None:
            config = cfg
        steps[url] = obj.get("global_step")
        epoch = obj.get("epoch", epoch)
        ranks[rank] = sr
    assert config is not None
    if len(set(map(str, steps.values()))) > 1:
        detail = ", ".join(f"step {s} in {u}" for u, s in steps.items())
        raise CkptError(folder, f"ranks come from different checkpoints: {detail}")
    _check_layout(folder, config, found.tp, found.pp, "rank files", found.files)
    step = next(iter(steps.values()))
    return Checkpoint(
        url=folder,
        kind="ptl",
        config=config,
        tp=found.tp,
        pp=found.pp,
        ranks=ranks,
        step=step if isinstance(step, int) else None,
        epoch=epoch if isinstance(epoch, int) else None,
        files=[(u, found.sizes[u]) for u in found.files.values()],
        notes=found.notes + [n for sr in ranks.values() for n in sr.notes],
        name=found.name,
    )


def training_config(hyper_parameters: Any, url: str) -> dict:
    """The model config in a Lightning checkpoint's ``hyper_parameters``, as plain data.

    NeMo saves ``hyper_parameters`` as an OmegaConf ``DictConfig`` of the form ``{cfg: {...}}``
    (``ModelPT`` calls ``save_hyperparameters("cfg")``); other writers leave a plain dict or
    Lightning's ``AttributeDict`` of the same form. A mapping with no ``cfg`` entry that holds a
    model config's own keys (a model that saved its config's fields as its hyper-parameters)
    is read as the config itself.
    """
    if hyper_parameters is None:
        raise CkptError(url, "no hyper_parameters in the checkpoint: it holds no model config")
    hp = to_plain(hyper_parameters, url, "hyper_parameters")
    if not isinstance(hp, dict):
        raise CkptError(
            url, f"hyper_parameters is a {type(hyper_parameters).__name__}, not a mapping"
        )
    cfg = hp.get("cfg")
    if cfg is None and _CONFIG_KEYS <= hp.keys():
        cfg = hp
    if not isinstance(cfg, dict):
        found = ", ".join(sorted(hp)[:8]) or "nothing"
        raise CkptError(
            url, f"no model config in hyper_parameters (no 'cfg' entry; it holds {found})"
        )
    return cfg


# Keys every Megatron model config holds: a flat hyper_parameters with them is a config.
_CONFIG_KEYS = frozenset({"hidden_size", "num_layers", "num_attention_heads"})


def _rank_of_member(rel: str, archive: str) -> tuple[int, int] | None:
    parts = rel.split("/")
    if parts[-1] != "model_weights.ckpt":
        return None
    if len(parts) == 1:
        return (0, -1)
    if len(parts) == 2:
        rank = parse_rank_folder(parts[0])
        if rank is None:
            raise CkptError(archive, f"unexpected weights file {rel}")
        return (rank[0], 0 if rank[1] is None else rank[1])
    return None


def _assemble_nemo(
    url: str, config: dict, rank_sources: dict[tuple[int, int], ByteSource], kind: str
) -> Checkpoint:
    """The checkpoint of a ``.nemo``'s rank files; it closes them (here, if this fails)."""
    return _owning(
        list(rank_sources.values()), lambda: _nemo_ranks(url, config, dict(rank_sources), kind)
    )


def _nemo_ranks(
    url: str, config: dict, rank_sources: dict[tuple[int, int], ByteSource], kind: str
) -> Checkpoint:
    if not rank_sources:
        raise CkptError(url, "no model_weights.ckpt in the archive")
    if (0, -1) in rank_sources:
        if len(rank_sources) > 1:
            raise CkptError(url, "archive holds both model_weights.ckpt and rank folders")
        rank_sources = {(0, 0): rank_sources.pop((0, -1))}
    tp = max(t for t, _ in rank_sources) + 1
    pp = max(p for _, p in rank_sources) + 1
    _check_layout(url, config, tp, pp, "rank folders", rank_sources)
    missing = [r for r in ((t, p) for p in range(pp) for t in range(tp)) if r not in rank_sources]
    if missing:
        names = ", ".join(rank_folder(t, p, tp, pp) or "" for t, p in missing)
        raise CkptError(url, f"missing rank folder(s) {names} of TP={tp} PP={pp}")
    ranks = {}
    for rank, src in sorted(rank_sources.items()):
        ranks[rank] = _torch_rank(src, *rank)[0]
    notes = [n for sr in ranks.values() for n in sr.notes]
    return Checkpoint(url=url, kind=kind, config=config, tp=tp, pp=pp, ranks=ranks, notes=notes)


def _check_unique(url: str, rank: tuple[int, int], rel: str, where: dict) -> None:
    """mp_rank_00/ and tp_rank_00_pp_rank_000/ both name TP rank 0 of stage 0."""
    if rank in where:
        t, p = rank
        raise CkptError(url, f"rank tp={t} pp={max(p, 0)} is stored twice: {where[rank]} and {rel}")
    where[rank] = rel


def _open_nemo_file(url: str, cache: RangeCache | None = None) -> Checkpoint:
    src = open_guarded(url, cache)
    try:
        ck, extracted = _read_nemo_file(url, src)
    except BaseException:
        src.close()
        raise
    if extracted:  # the checkpoint reads the extracted folder, never the archive again
        src.close()
    else:
        ck._cleanup.append(src.close)
    return ck


def _read_nemo_file(url: str, src: ByteSource) -> tuple[Checkpoint, bool]:
    """The checkpoint in the archive ``src``, and whether it was extracted (gzip)."""
    if nemo_fmt.is_gzip(src):
        tmp = tempfile.TemporaryDirectory(prefix="ckpt-nemo-")
        try:
            nemo_fmt.extract_gzip_tar(src, tmp.name)
            if not os.path.isfile(os.path.join(tmp.name, nemo_fmt.CONFIG_NAME)):
                raise CkptError(url, "not a .nemo archive: no model_config.yaml member")
            ck = _open_nemo_dir(tmp.name, display=url)
        except BaseException:
            tmp.cleanup()
            raise
        ck.kind = "nemo"
        ck.url = url
        ck.files = [(url, src.size)]
        ck._cleanup.append(tmp.cleanup)
        return ck, True
    members = nemo_fmt.index_tar(src)
    if nemo_fmt.CONFIG_NAME not in members:
        raise CkptError(url, "not a .nemo archive: no model_config.yaml member")
    cfg_member = members[nemo_fmt.CONFIG_NAME]
    config = nemo_fmt.parse_config(bytes(src.read(cfg_member.offset, cfg_member.size)), url)
    rank_sources = {}
    where: dict[tuple[int, int], str] = {}
    for rel, member in members.items():
        rank = _rank_of_member(rel, url)
        if rank is not None:
            _check_unique(url, rank, rel, where)
            rank_sources[rank] = nemo_fmt.member_source(src, member, url)
    ck = _assemble_nemo(url, config, rank_sources, "nemo")
    ck.files = [(url, src.size)]
    return ck, False


def _open_nemo_dir(
    url: str, display: str | None = None, cache: RangeCache | None = None
) -> Checkpoint:
    shown = display or url
    fs, root = get_fs(url)
    try:
        found = fs.find(root, withdirs=False, detail=True)
    except Exception as exc:
        raise storage_error(shown, "cannot list", exc) from exc
    entries = sorted(found.values(), key=lambda e: e["name"])
    for entry in entries:  # before reading anything: a linked config could be any file
        if entry.get("type") == "link" or (is_local(url) and os.path.islink(entry["name"])):
            rel = entry["name"][len(root.rstrip("/")) + 1 :]
            raise CkptError(shown, f"unsafe entry {rel!r}: links are not allowed")
    cfg_path = root.rstrip("/") + "/" + nemo_fmt.CONFIG_NAME
    try:
        with fs.open(cfg_path, "rb") as f:
            data = f.read(nemo_fmt.MAX_CONFIG_BYTES + 1)
    except Exception as exc:
        raise storage_error(
            f"{shown.rstrip('/')}/{nemo_fmt.CONFIG_NAME}", "cannot read", exc
        ) from exc
    config = nemo_fmt.parse_config(data, shown)
    rank_sources: dict[tuple[int, int], ByteSource] = {}
    files = []
    where: dict[tuple[int, int], str] = {}
    try:
        for entry in entries:
            rel = entry["name"][len(root.rstrip("/")) + 1 :]
            rank = _rank_of_member(rel, shown)
            if rank is None:
                continue
            _check_unique(shown, rank, rel, where)
            if is_local(url):
                src: ByteSource = LocalFile(entry["name"], f"{shown}/{rel}")
            else:
                src = open_guarded(f"{url.rstrip('/')}/{rel}", cache)
            rank_sources[rank] = src
            files.append((f"{shown.rstrip('/')}/{rel}", int(entry.get("size") or 0)))
    except BaseException:
        _close_all(rank_sources.values())
        raise
    ck = _assemble_nemo(shown, config, rank_sources, "nemo-dir")
    ck.files = files
    return ck


__all__ = ["Checkpoint", "LazyTensor", "SourceRank", "open_checkpoint", "spec_of", "local_path"]
