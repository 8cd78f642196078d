"""The streaming engine: execute a plan one target file, one tensor at a time.

Source tensors are mmapped views (or ranged reads); each target tensor is made from its pieces
(a view when one contiguous piece suffices, one ``torch.cat`` otherwise), cast if asked, checked,
written, and dropped. Anonymous memory therefore stays near the largest tensor.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ckptcore.errors import CkptError
from ckptcore.formats.torchzip import write_state_dict
from ckptcore.plan import FilePlan, Piece, Plan, TargetTensor
from ckptcore.sources import Checkpoint


def _read_piece(ck: Checkpoint, pc: Piece, dim: int | None) -> torch.Tensor:
    t = ck.ranks[(pc.tp_rank, pc.pp_rank)].tensor(pc.key)
    if pc.start is not None and dim is not None:
        t = t.narrow(dim, pc.start, pc.length)
    return t


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def make_tensor(ck: Checkpoint, tt: TargetTensor, allow_nonfinite: bool = True) -> torch.Tensor:
    """The target tensor of ``tt``, from its source pieces."""
    spec = tt.spec
    assert spec is not None
    parts = [_read_piece(ck, pc, tt.dim) for pc in tt.pieces]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=tt.dim)
    for rp in tt.replicas:
        other = _read_piece(ck, rp, None)
        if other.shape != t.shape or not torch.equal(_bits(other), _bits(t)):
            first = tt.pieces[0]
            raise CkptError(
                ck.url,
                f"replicated tensor differs between ranks (tp={first.tp_rank}, pp={first.pp_rank}) "
                f"and (tp={rp.tp_rank}, pp={rp.pp_rank})",
                tt.key,
            )
    if not allow_nonfinite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CkptError(
            ck.url, "holds NaN or Inf values (pass --allow-nonfinite to keep them)", tt.key
        )
    if t.dtype != spec.dtype:
        t = t.to(spec.dtype)
    return t


def iter_file(
    ck: Checkpoint, fp: FilePlan, allow_nonfinite: bool = True
) -> Iterator[tuple[str, torch.Tensor | None]]:
    for tt in fp.tensors:
        yield tt.key, (None if tt.spec is None else make_tensor(ck, tt, allow_nonfinite))


def materialize(ck: Checkpoint, fp: FilePlan) -> OrderedDict:
    """One target rank's state dict in memory (for loading a model, not for conversion)."""
    sd = OrderedDict()
    for key, value in iter_file(ck, fp):
        sd[key] = None if value is None else value.clone()
    meta = fp.metadata_dict()
    if meta is not None:
        sd._metadata = meta  # type: ignore[attr-defined]
    return sd


def write_file(
    ck: Checkpoint,
    fp: FilePlan,
    out_dir: str,
    allow_nonfinite: bool = True,
    on_tensor: Callable[[str, int], None] | None = None,
) -> str:
    """Write one target rank file under ``out_dir`` (NeMo's record prefix); returns its path."""
    final = os.path.join(out_dir, fp.path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = os.path.join(os.path.dirname(final), fp.archive_name + ".ckpt")
    by_key = {tt.key: tt for tt in fp.tensors}
    entries = [(tt.key, tt.spec) for tt in fp.tensors]
    try:
        write_state_dict(
            tmp,
            entries,
            lambda key: make_tensor(ck, by_key[key], allow_nonfinite),
            metadata=fp.metadata_dict(),
            on_tensor=on_tensor,
        )
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def execute(
    plan: Plan,
    ck: Checkpoint,
    out_dir: str,
    workers: int = 1,
    allow_nonfinite: bool = True,
    on_tensor: Callable[[str, int], None] | None = None,
) -> list[str]:
    """Write every target rank file of ``plan`` into ``out_dir``; ``workers`` files at a time."""
    if workers <= 1 or len(plan.files) == 1:
        return [write_file(ck, fp, out_dir, allow_nonfinite, on_tensor) for fp in plan.files]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(write_file, ck, fp, out_dir, allow_nonfinite, on_tensor)
            for fp in plan.files
        ]
        return [f.result() for f in futures]
