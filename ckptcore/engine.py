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


class Scratch:
    """One reusable, pre-faulted buffer per worker: target tensors are assembled into it.

    Fresh allocations cost page faults on every tensor (the dominant CPU cost when resharding);
    reusing one buffer sized to the largest tensor keeps anonymous memory flat and the copies fast.
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def view(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buf = torch.zeros(nbytes, dtype=torch.uint8)  # zeros: fault the pages in once
        return self._buf[:nbytes].view(dtype).view(shape)


def make_tensor(
    ck: Checkpoint, tt: TargetTensor, allow_nonfinite: bool = True, scratch: Scratch | None = None
) -> torch.Tensor:
    """The target tensor of ``tt``, from its source pieces.

    A single contiguous piece of the right dtype is returned as is (a view of the source mmap);
    anything else is assembled into ``scratch`` (or a new tensor), valid until the next call.
    """
    spec = tt.spec
    assert spec is not None
    parts = [_read_piece(ck, pc, tt.dim) for pc in tt.pieces]
    for rp in tt.replicas:
        other = _read_piece(ck, rp, None)
        if other.shape != parts[0].shape or not torch.equal(_bits(other), _bits(parts[0])):
            first = tt.pieces[0]
            raise CkptError(
                ck.url,
                f"replicated tensor differs between ranks (tp={first.tp_rank}, pp={first.pp_rank}) "
                f"and (tp={rp.tp_rank}, pp={rp.pp_rank})",
                tt.key,
            )
    if not allow_nonfinite:
        for part in parts:
            if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                raise CkptError(
                    ck.url, "holds NaN or Inf values (pass --allow-nonfinite to keep them)", tt.key
                )
    if len(parts) == 1 and parts[0].dtype == spec.dtype and parts[0].is_contiguous():
        return parts[0]
    out = (
        scratch.view(spec.dtype, spec.shape, spec.nbytes)
        if scratch is not None
        else torch.empty(spec.shape, dtype=spec.dtype)
    )
    if len(parts) == 1:
        out.copy_(parts[0])
    elif all(p.dtype == spec.dtype for p in parts):
        torch.cat(parts, dim=tt.dim, out=out)
    else:
        offset = 0
        for part in parts:
            n = part.shape[tt.dim]
            out.narrow(tt.dim, offset, n).copy_(part)
            offset += n
    return out


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
    scratch = Scratch()
    try:
        write_state_dict(
            tmp,
            entries,
            lambda key: make_tensor(ck, by_key[key], allow_nonfinite, scratch),
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
