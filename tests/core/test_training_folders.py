"""Lightning training folders -> .nemo: layouts, checkpoint selection, bitwise-equal tensors."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import bitwise_equal, open_files_under, rank_state_dicts

from ckptcore.api import convert, load_state_dict
from ckptcore.errors import CkptError
from ckptcore.sample import shard, vit_config, write_training_checkpoint
from ckptcore.sources import open_checkpoint


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (2, 2)])
def test_convert_keeps_every_rank_bitwise(tmp_path, tp: int, pp: int) -> None:
    cfg = vit_config("tiny")
    folder = tmp_path / "checkpoints"
    _, full = write_training_checkpoint(str(folder), cfg, tp=tp, pp=pp)
    out = tmp_path / "model.nemo"
    report = convert(str(folder), str(out))
    assert (
        report.layout.source_tp,
        report.layout.source_pp,
        report.layout.target_tp,
        report.layout.target_pp,
    ) == (
        tp,
        pp,
        tp,
        pp,
    )
    ranks = rank_state_dicts(str(out))
    expected = shard(cfg, full, tp, pp)
    assert ranks.keys() == expected.keys()
    for rank, sd in expected.items():
        assert bitwise_equal(ranks[rank], sd), rank
    # and the rank files hold what the training checkpoint's state_dict held
    with open_checkpoint(str(folder)) as ck:
        for rank, sr in ck.ranks.items():
            src = {k: None if v is None else sr.tensor(k) for k, v in sr.state.items()}
            assert bitwise_equal(ranks[rank], src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_checkpoint(tmp_path, dtype) -> None:
    cfg = vit_config("tiny", dtype=dtype)
    folder = tmp_path / "ck"
    _, full = write_training_checkpoint(str(folder), cfg, tp=2, dtype=dtype)
    out = tmp_path / "m.nemo"
    convert(str(folder), str(out), target_tp=1)
    _, sd = load_state_dict(str(out))
    assert bitwise_equal(sd, full)


def test_checkpoint_selection(tmp_path) -> None:
    cfg = vit_config("tiny")
    folder = str(tmp_path)
    write_training_checkpoint(folder, cfg, tp=2, step=10, last=False, seed=1)
    write_training_checkpoint(folder, cfg, tp=2, step=20, last=True, seed=2)
    write_training_checkpoint(folder, cfg, tp=2, step=30, last=False, seed=3, unfinished=True)
    with open_checkpoint(folder, "last") as ck:
        assert ck.step == 20 and ck.name.endswith("-last.ckpt")
    with open_checkpoint(folder, "latest") as ck:
        assert ck.step == 20  # step 30 is unfinished
        assert any("unfinished" in n for n in ck.notes)
    name10 = next(n for n in os.listdir(tmp_path / "mp_rank_00") if "step=10" in n)
    with open_checkpoint(folder, name10) as ck:
        assert ck.step == 10
    name30 = next(n for n in os.listdir(tmp_path / "mp_rank_00") if "step=30" in n)
    with pytest.raises(CkptError, match="unfinished"):
        open_checkpoint(folder, name30)
    with pytest.raises(CkptError, match="not found"):
        open_checkpoint(folder, "nope.ckpt")


def test_two_checkpoints_matching_last(tmp_path) -> None:
    cfg = vit_config("tiny")
    write_training_checkpoint(str(tmp_path), cfg, step=10, last=True)
    write_training_checkpoint(str(tmp_path), cfg, step=20, last=True)
    with pytest.raises(CkptError, match="2 checkpoints match 'last'") as info:
        open_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_rank(tmp_path) -> None:
    cfg = vit_config("tiny")
    name, _ = write_training_checkpoint(str(tmp_path), cfg, tp=2, pp=2)
    os.remove(tmp_path / "tp_rank_01_pp_rank_001" / name)
    with pytest.raises(CkptError, match=r"missing rank\(s\) tp_rank_01_pp_rank_001"):
        open_checkpoint(str(tmp_path))


def test_config_must_agree_with_rank_folders(tmp_path) -> None:
    cfg = vit_config("tiny")
    # two rank folders whose hyper_parameters say TP=1
    for rank in ("mp_rank_00", "mp_rank_01"):
        write_training_checkpoint(str(tmp_path / rank), cfg, tp=1)
    with pytest.raises(CkptError, match="config says TP=1 PP=1 but the rank files hold TP=2 PP=1"):
        open_checkpoint(str(tmp_path))


def test_single_file_whose_config_wants_more_ranks(tmp_path) -> None:
    cfg = vit_config("tiny")
    name, _ = write_training_checkpoint(str(tmp_path / "a"), cfg, tp=2)
    os.makedirs(tmp_path / "b")
    os.rename(tmp_path / "a" / "mp_rank_00" / name, tmp_path / "b" / name)
    with pytest.raises(CkptError, match=r"missing rank\(s\) mp_rank_01 of TP=2 PP=1"):
        open_checkpoint(str(tmp_path / "b"))


def test_ranks_from_different_steps(tmp_path) -> None:
    """... is an error; a failed open (this one, or a rank file that is not a zip) closes the
    files it opened."""
    cfg = vit_config("tiny")
    name, _ = write_training_checkpoint(str(tmp_path / "a"), cfg, tp=2, step=10)
    other, _ = write_training_checkpoint(str(tmp_path / "b"), cfg, tp=2, step=20)
    os.replace(tmp_path / "b" / "mp_rank_01" / other, tmp_path / "a" / "mp_rank_01" / name)
    with pytest.raises(CkptError, match="different checkpoints"):
        open_checkpoint(str(tmp_path / "a"))
    assert open_files_under(str(tmp_path)) == []
    with open(tmp_path / "a" / "mp_rank_01" / name, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CkptError):
        open_checkpoint(str(tmp_path / "a"))
    assert open_files_under(str(tmp_path)) == []


def test_empty_folder(tmp_path) -> None:
    with pytest.raises(CkptError, match="no .ckpt files found"):
        open_checkpoint(str(tmp_path))


def test_closing_a_checkpoint_closes_its_files(tmp_path) -> None:
    """A long-lived process (a sweep converting many checkpoints) must not keep rank files or
    ``.nemo`` archives open once done with them."""
    import gzip
    import shutil
    import tarfile
    import tempfile

    from ckptcore.sample import write_nemo

    cfg = vit_config("tiny")
    write_training_checkpoint(str(tmp_path / "ptl"), cfg, tp=2)
    write_nemo(str(tmp_path / "m.nemo"), cfg, tp=2)
    with open(tmp_path / "m.nemo", "rb") as f, gzip.open(tmp_path / "z.nemo", "wb") as g:
        shutil.copyfileobj(f, g)
    with tarfile.open(tmp_path / "m.nemo") as tar:  # an extracted .nemo (our own file)
        tar.extractall(tmp_path / "dir", filter="data")
    extracted = os.path.join(tempfile.gettempdir(), "ckpt-nemo-")  # where z.nemo is read from
    for name in ("ptl", "m.nemo", "z.nemo", "dir"):
        with open_checkpoint(str(tmp_path / name)) as ck:
            held = open_files_under(str(tmp_path)) + open_files_under(tempfile.gettempdir())
            assert any(p.startswith((str(tmp_path), extracted)) for p in held), name
            load_state_dict(ck)
        assert open_files_under(str(tmp_path)) == [], name
        assert not [p for p in open_files_under(tempfile.gettempdir()) if extracted in p], name
