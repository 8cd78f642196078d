"""Rank layouts: how NeMo names the per-rank files of a TP x PP checkpoint, and layer placement."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ckptcore.errors import CkptError

MP_RANK_RE = re.compile(r"^mp_rank_(\d{2})$")
TP_PP_RANK_RE = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})$")


def rank_folder(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str | None:
    """NeMo's folder for a rank: None (TP=PP=1), ``mp_rank_XX`` (PP=1) or ``tp_rank_XX_pp_rank_YYY``."""
    if tp == 1 and pp == 1:
        return None
    if pp == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}"


def parse_rank_folder(name: str) -> tuple[int, int | None] | None:
    """(tp_rank, pp_rank) of a rank folder name; pp_rank is None for ``mp_rank_XX``."""
    m = MP_RANK_RE.match(name)
    if m:
        return int(m.group(1)), None
    m = TP_PP_RANK_RE.match(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None


@dataclass(frozen=True)
class RankLayout:
    """A TP x PP layout and how global layers map onto pipeline stages."""

    tp: int
    pp: int
    layers_per_stage: tuple[int, ...]

    @classmethod
    def even(cls, tp: int, pp: int, num_layers: int) -> RankLayout:
        if tp < 1 or pp < 1:
            raise CkptError(None, f"TP and PP must be >= 1, got TP={tp} PP={pp}")
        if num_layers % pp:
            if num_layers < pp:
                raise CkptError(
                    None, f"PP={pp} is more stages than the model's {num_layers} layer(s)"
                )
            base, extra = divmod(num_layers, pp)
            example = ",".join(str(base + (i >= pp - extra)) for i in range(pp))
            raise CkptError(
                None,
                f"PP={pp} does not divide num_layers={num_layers}; "
                f"give --layers-per-stage (e.g. {example}) for an uneven split",
            )
        return cls(tp, pp, (num_layers // pp,) * pp)

    @classmethod
    def explicit(cls, tp: int, layers_per_stage: list[int], num_layers: int) -> RankLayout:
        if any(n < 1 for n in layers_per_stage):
            raise CkptError(
                None, f"--layers-per-stage needs positive counts, got {layers_per_stage}"
            )
        if sum(layers_per_stage) != num_layers:
            raise CkptError(
                None,
                f"--layers-per-stage {layers_per_stage} sums to {sum(layers_per_stage)}, model has {num_layers} layers",
            )
        return cls(tp, len(layers_per_stage), tuple(layers_per_stage))

    @property
    def ranks(self) -> list[tuple[int, int]]:
        return [(t, p) for p in range(self.pp) for t in range(self.tp)]

    def stage_start(self, pp_rank: int) -> int:
        return sum(self.layers_per_stage[:pp_rank])

    def stage_of_layer(self, layer: int) -> tuple[int, int]:
        """(pp_rank, local_layer) holding global ``layer``."""
        start = 0
        for stage, n in enumerate(self.layers_per_stage):
            if layer < start + n:
                return stage, layer - start
            start += n
        raise CkptError(None, f"layer {layer} is beyond the {start} layers of this layout")

    def weights_path(self, tp_rank: int, pp_rank: int, filename: str = "model_weights.ckpt") -> str:
        folder = rank_folder(tp_rank, pp_rank, self.tp, self.pp)
        return filename if folder is None else f"{folder}/{filename}"

    def archive_name(self, tp_rank: int, pp_rank: int) -> str:
        """The record prefix NeMo's files carry: ``model_weights`` or ``mp_rank_00_model_weights``."""
        folder = rank_folder(tp_rank, pp_rank, self.tp, self.pp)
        return "model_weights" if folder is None else f"{folder}_model_weights"
