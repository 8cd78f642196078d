"""validate_plan refuses plans that would read a source slice twice, leave one unread, read out
of bounds or cover a target tensor short; built plans pass it at every layout."""

from __future__ import annotations

import dataclasses

import pytest

from ckptcore.errors import CkptError
from ckptcore.plan import Piece, build_plan, validate_plan
from ckptcore.sample import vit_config, write_nemo
from ckptcore.sources import open_checkpoint

QKV = "model.backbone.transformer.layers.0.self_attention.query_key_value.weight"


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "tp2.nemo"
    write_nemo(str(path), vit_config("tiny", megatron_legacy=True), tp=2)  # strided q/k/v too
    with open_checkpoint(str(path)) as ck:
        yield ck


def _edit(plan, file_index: int, key: str, pieces: tuple[Piece, ...]):
    """The plan with one target tensor's pieces replaced."""
    fp = plan.files[file_index]
    tensors = tuple(
        dataclasses.replace(t, pieces=pieces) if t.key == key else t for t in fp.tensors
    )
    files = list(plan.files)
    files[file_index] = dataclasses.replace(fp, tensors=tensors)
    return dataclasses.replace(plan, files=tuple(files))


def _pieces(plan, file_index: int, key: str) -> tuple[Piece, ...]:
    return next(t.pieces for t in plan.files[file_index].tensors if t.key == key)


@pytest.mark.parametrize("target", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_built_plans_pass(tp2, target) -> None:
    validate_plan(build_plan(tp2, *target), tp2)


def test_a_slice_read_twice(tp2) -> None:
    """Target rank 1 reads target rank 0's rows: same total length, but an overlap (and a gap)."""
    plan = build_plan(tp2, 4, 1)
    bad = _edit(plan, 1, QKV, _pieces(plan, 0, QKV))
    with pytest.raises(CkptError, match=r"plan reads rows 0\.\.16 of tp rank 0's shard twice"):
        validate_plan(bad, tp2)


def test_a_slice_never_read(tp2) -> None:
    """Two pieces shifted so one row is read twice at the end: the first rows are never read."""
    plan = build_plan(tp2, 4, 1)
    pieces = _pieces(plan, 0, QKV)
    shifted = tuple(dataclasses.replace(p, start=(p.start or 0) + 1) for p in pieces)
    bad = _edit(plan, 0, QKV, shifted)
    with pytest.raises(CkptError, match=r"plan never reads rows 0\.\.1 of tp rank 0's shard|twice"):
        validate_plan(bad, tp2)


def test_a_shard_never_read(tp2) -> None:
    plan = build_plan(tp2, 1, 1)
    pieces = _pieces(plan, 0, QKV)
    only_rank0 = tuple(dataclasses.replace(p, tp_rank=0) for p in pieces)
    with pytest.raises(CkptError, match="plan never reads tp rank 1's shard|twice"):
        validate_plan(_edit(plan, 0, QKV, only_rank0), tp2)


def test_out_of_bounds_and_short(tp2) -> None:
    plan = build_plan(tp2, 1, 1)  # the target reads six slices of the two shards
    first = _pieces(plan, 0, QKV)[0]
    with pytest.raises(CkptError, match="out of bounds"):
        validate_plan(_edit(plan, 0, QKV, (dataclasses.replace(first, start=10_000),)), tp2)
    with pytest.raises(CkptError, match="plan covers 32 of 192 rows along dim 0"):
        validate_plan(_edit(plan, 0, QKV, (first,)), tp2)
