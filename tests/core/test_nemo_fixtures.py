"""Compatibility with files written by the real NeMo 2.3.2 (tests/fixtures/nemo-2.3.2)."""

from __future__ import annotations

import tarfile

import pytest
import torch
from helpers import bitwise_equal, rank_state_dicts

from ckptcore.api import convert, load_state_dict
from ckptcore.model.vit import VitClassificationModel


@pytest.mark.parametrize("name", ["tiny_vit_tp1.nemo", "tiny_vit_tp2.nemo"])
def test_restore_gives_nemo_logits(fixtures, fixture_forward, name: str) -> None:
    images, logits = fixture_forward
    model = VitClassificationModel.restore_from(
        restore_path=str(fixtures / name), map_location="cpu"
    )
    with torch.no_grad():
        out = model(images)
    assert torch.allclose(out, logits, atol=1e-5, rtol=0)


def _members(path) -> list[tuple[str, str]]:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, "dir" if m.isdir() else "file") for m in tar.getmembers()]


@pytest.mark.parametrize(("name", "tp"), [("tiny_vit_tp1.nemo", 1), ("tiny_vit_tp2.nemo", 2)])
def test_save_to_matches_nemo_layout_and_tensors(fixtures, tmp_path, name: str, tp: int) -> None:
    model = VitClassificationModel.restore_from(str(fixtures / name))
    out = tmp_path / "saved.nemo"
    model.save_to(str(out), tensor_parallel_size=tp)
    assert _members(out) == _members(fixtures / name)
    assert bitwise_equal_all(rank_state_dicts(str(out)), rank_state_dicts(str(fixtures / name)))


def bitwise_equal_all(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[r], b[r]) for r in a)


def test_reshard_tp1_to_tp2_equals_nemo_tp2_and_back(fixtures, tmp_path) -> None:
    tp2 = tmp_path / "tp2.nemo"
    convert(str(fixtures / "tiny_vit_tp1.nemo"), str(tp2), target_tp=2)
    assert bitwise_equal_all(
        rank_state_dicts(str(tp2)), rank_state_dicts(str(fixtures / "tiny_vit_tp2.nemo"))
    )
    # the rank files are even byte-identical to NeMo's own
    with tarfile.open(tp2) as ours, tarfile.open(fixtures / "tiny_vit_tp2.nemo") as theirs:
        for rank in ("mp_rank_00", "mp_rank_01"):
            member = f"./{rank}/model_weights.ckpt"
            assert ours.extractfile(member).read() == theirs.extractfile(member).read()
    back = tmp_path / "tp1.nemo"
    convert(str(tp2), str(back), target_tp=1)
    assert bitwise_equal_all(
        rank_state_dicts(str(back)), rank_state_dicts(str(fixtures / "tiny_vit_tp1.nemo"))
    )


def test_nemo_tp2_to_tp1_equals_nemo_tp1(fixtures, tmp_path) -> None:
    out = tmp_path / "tp1.nemo"
    convert(str(fixtures / "tiny_vit_tp2.nemo"), str(out), target_tp=1)
    _, ours = load_state_dict(str(out))
    _, theirs = load_state_dict(str(fixtures / "tiny_vit_tp1.nemo"))
    assert bitwise_equal(ours, theirs)
    with tarfile.open(out) as ours_tar, tarfile.open(fixtures / "tiny_vit_tp1.nemo") as theirs_tar:
        member = "./model_weights.ckpt"
        assert ours_tar.extractfile(member).read() == theirs_tar.extractfile(member).read()


def test_extracted_and_gzip_nemo_read_the_same(fixtures, tmp_path) -> None:
    src = fixtures / "tiny_vit_tp2.nemo"
    folder = tmp_path / "extracted"
    with tarfile.open(src) as tar:
        tar.extractall(folder, filter="data")
    gz = tmp_path / "old.nemo"
    with tarfile.open(src) as tar, tarfile.open(gz, "w:gz") as out:
        for m in tar.getmembers():
            out.addfile(m, tar.extractfile(m) if m.isfile() else None)
    ref = rank_state_dicts(str(src))
    assert bitwise_equal_all(rank_state_dicts(str(folder)), ref)
    assert bitwise_equal_all(rank_state_dicts(str(gz)), ref)
