"""Small shared test helpers: read a .nemo's per-rank state dicts and compare them bitwise."""

from __future__ import annotations

import torch

from ckptcore.sources import open_checkpoint


def rank_state_dicts(path: str) -> dict[tuple[int, int], dict]:
    out = {}
    with open_checkpoint(path) as ck:
        for rank, sr in ck.ranks.items():
            out[rank] = {
                k: (None if v is None else sr.tensor(k).clone()) for k, v in sr.state.items()
            }
    return out


def bitwise_equal(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x is None or y is None:
            if x is not y:
                return False
            continue
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(
            x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        ):
            return False
    return True
