"""PyTorch Lightning checkpoint folders as NeMo training writes them.

Layouts: ``<name>.ckpt`` (TP=PP=1), ``mp_rank_XX/<name>.ckpt`` (PP=1),
``tp_rank_XX_pp_rank_YYY/<name>.ckpt``. While a save is in progress NeMo leaves a
``<stem>-unfinished`` marker beside them; such checkpoints are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ckptcore.errors import CkptError, storage_error
from ckptcore.layout import parse_rank_folder
from ckptcore.storage import get_fs, join

UNFINISHED = "-unfinished"
STEP_RE = re.compile(r"step=(\d+)")


@dataclass
class PtlCheckpoint:
    folder: str
    name: str  # file name, e.g. megatron_vit--step=10-last.ckpt
    tp: int
    pp: int
    files: dict[tuple[int, int], str]  # (tp_rank, pp_rank) -> URL
    sizes: dict[str, int]
    notes: list[str] = field(default_factory=list)


def _listing(folder: str) -> tuple[list[dict], object, str]:
    fs, path = get_fs(folder)
    try:
        if not fs.isdir(path):
            if fs.exists(path):
                raise CkptError(folder, "expected a checkpoint folder, found a file")
            raise CkptError(folder, "checkpoint folder not found")
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise CkptError(folder, "checkpoint folder not found") from None
    except CkptError:
        raise
    except Exception as exc:  # the storage failed to answer: retryable, not the input's fault
        raise storage_error(folder, "cannot list", exc) from exc
    return entries, fs, path


def _list_rank_folder(fs, path: str, url: str) -> list[dict]:
    try:
        return fs.ls(path, detail=True)
    except Exception as exc:
        raise storage_error(url, "cannot list", exc) from exc


def scan_folder(
    folder: str,
) -> tuple[dict[str, dict[tuple[int, int | None], tuple[str, int]]], set[str]]:
    """All checkpoint names in a folder -> {rank: (url, size)}, and the unfinished stems."""
    entries, fs, path = _listing(folder)
    found: dict[str, dict[tuple[int, int | None], tuple[str, int]]] = {}
    unfinished: set[str] = set()

    def add(name: str, rank: tuple[int, int | None], url: str, size: int) -> None:
        ranks = found.setdefault(name, {})
        if rank in ranks:
            raise CkptError(url, f"rank {rank} of checkpoint {name} is present twice")
        ranks[rank] = (url, size)

    for entry in entries:
        base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        url = join(folder, base)
        if entry["type"] == "directory":
            rank = parse_rank_folder(base)
            if rank is None:
                continue
            for sub in _list_rank_folder(fs, entry["name"], url):
                sbase = sub["name"].rstrip("/").rsplit("/", 1)[-1]
                if sub["type"] != "directory" and sbase.endswith(".ckpt"):
                    add(sbase, rank, join(url, sbase), int(sub.get("size") or 0))
        elif base.endswith(UNFINISHED):
            unfinished.add(base[: -len(UNFINISHED)])
        elif base.endswith(".ckpt"):
            add(base, (0, -1), url, int(entry.get("size") or 0))
    return found, unfinished


def _stem(name: str) -> str:
    return name[: -len(".ckpt")] if name.endswith(".ckpt") else name


def _step(name: str) -> int:
    m = STEP_RE.search(name)
    return int(m.group(1)) if m else -1


def find_checkpoint(folder: str, checkpoint: str = "last") -> PtlCheckpoint:
    """Pick one checkpoint of a training folder and check that all its ranks are there.

    ``checkpoint`` is an exact file name, ``last`` (the ``-last.ckpt``), or ``latest`` (highest
    ``step=``). Checkpoints with an ``-unfinished`` marker are skipped, and the notes say so.
    """
    found, unfinished = scan_folder(folder)
    if not found:
        raise CkptError(
            folder,
            "no .ckpt files found (looked for <name>.ckpt, mp_rank_XX/, tp_rank_XX_pp_rank_YYY/)",
        )
    notes: list[str] = []
    complete = {}
    for name in sorted(found):
        if _stem(name) in unfinished:
            notes.append(f"skipped {name}: an -unfinished marker says its save did not complete")
        else:
            complete[name] = found[name]
    if checkpoint in ("last", "latest"):
        if checkpoint == "last":
            cands = [n for n in complete if _stem(n).endswith("-last")]
            if not cands:
                raise CkptError(
                    folder, f"no finished -last.ckpt checkpoint (found: {', '.join(sorted(found))})"
                )
            if len(cands) > 1:
                raise CkptError(
                    folder,
                    f"{len(cands)} checkpoints match 'last': {', '.join(cands)}; name one with --checkpoint",
                )
            name = cands[0]
        else:
            if not complete:
                raise CkptError(folder, "no finished checkpoint")
            name = max(complete, key=lambda n: (_step(n), n.endswith("-last.ckpt"), n))
    else:
        name = checkpoint if checkpoint.endswith(".ckpt") else checkpoint + ".ckpt"
        if name not in found:
            raise CkptError(
                folder, f"checkpoint {name} not found (found: {', '.join(sorted(found))})"
            )
        if name not in complete:
            raise CkptError(
                folder, f"checkpoint {name} has an -unfinished marker: its save did not complete"
            )
    return _assemble(folder, name, complete[name], notes)


def _assemble(folder: str, name: str, ranks: dict, notes: list[str]) -> PtlCheckpoint:
    kinds = {("single" if pp == -1 else "mp" if pp is None else "tp_pp") for (_, pp) in ranks}
    if len(kinds) > 1:
        raise CkptError(
            folder, f"checkpoint {name} mixes rank layouts ({', '.join(sorted(kinds))})"
        )
    kind = kinds.pop()
    files: dict[tuple[int, int], str] = {}
    sizes: dict[str, int] = {}
    for (tp_rank, pp_rank), (url, size) in ranks.items():
        pp_rank = 0 if pp_rank in (None, -1) else pp_rank
        files[(tp_rank, pp_rank)] = url
        sizes[url] = size
    tp = max(t for t, _ in files) + 1
    pp = max(p for _, p in files) + 1
    missing = [(t, p) for p in range(pp) for t in range(tp) if (t, p) not in files]
    if missing:

        def fmt(t: int, p: int) -> str:
            return f"mp_rank_{t:02d}" if kind == "mp" else f"tp_rank_{t:02d}_pp_rank_{p:03d}"

        raise CkptError(
            folder,
            f"checkpoint {name} is missing rank(s) {', '.join(fmt(t, p) for t, p in missing)} of TP={tp} PP={pp}",
        )
    return PtlCheckpoint(folder, name, tp, pp, files, sizes, notes)
