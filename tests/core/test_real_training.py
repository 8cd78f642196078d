"""Real training runs of NeMo 2.3.2 (``tests/fixtures/nemo-2.3.2/training``): each converts to
exactly what NeMo's own ``save_to`` wrote for the trained model, and repartitions to NeMo's logits.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import bitwise_equal, rank_state_dicts
from real_nemo import (
    FIXTURES,
    read_nemo,
    run_dir,
    run_expected,
    run_logits,
    run_nemo,
    standalone_logits,
    standalone_nemo,
    training_runs,
)

from ckptcore.api import convert, inspect
from ckptcore.model.vit import VitClassificationModel

RUNS = training_runs()


def test_the_corpus_covers_what_users_have() -> None:
    runs = [run_expected(name) | {"name": name} for name in RUNS]
    assert {1, 2, 4} <= {r["tp"] for r in runs}
    configs = [yaml.safe_load(read_nemo(run_nemo(name))[0]) for name in RUNS]
    assert {c.get("finetune", False) for c in configs} == {False, True}  # both head types
    assert len({c.get("class_token_length", 8) for c in configs}) >= 3
    assert any(c["megatron_amp_O2"] and c["precision"] == "bf16" for c in configs)


@pytest.mark.parametrize("path", standalone_nemo())
def test_nemo_files_restore_to_nemo_logits(path: str) -> None:
    images, logits = standalone_logits(path)
    model = VitClassificationModel.restore_from(str(FIXTURES / path))
    with torch.no_grad():
        got = model(images)
    assert got.dtype == logits.dtype or model.dtype == torch.bfloat16
    assert torch.allclose(got.float(), logits, atol=1e-5, rtol=0), float((got - logits).abs().max())


@pytest.mark.parametrize("name", RUNS)
def test_convert_equals_nemo_save_to(tmp_path, name: str) -> None:
    out = tmp_path / "out.nemo"
    report = convert(str(run_dir(name) / "checkpoints"), str(out))
    assert report.layout.step == run_expected(name)["steps"]
    ours_config, ours = read_nemo(out)
    theirs_config, theirs = read_nemo(run_nemo(name))
    assert ours.keys() == theirs.keys()
    for member in theirs:
        assert bitwise_equal(ours[member], theirs[member]), member
    # the config NeMo saved in the training checkpoint is the one its save_to writes
    assert ours_config == theirs_config


@pytest.mark.parametrize("target", [(1, 1), (1, 2)], ids=["tp1", "tp1pp2"])
@pytest.mark.parametrize("name", RUNS)
def test_repartitioned_run_gives_nemo_logits(tmp_path, name: str, target) -> None:
    tp, pp = target
    out = tmp_path / f"tp{tp}pp{pp}.nemo"
    layers = run_expected(name).get("overrides", {}).get("num_layers", "2")
    split = None if int(layers) % pp == 0 else [int(layers) // pp + 1, int(layers) // pp]
    convert(
        str(run_dir(name) / "checkpoints"),
        str(out),
        target_tp=tp,
        target_pp=pp,
        layers_per_stage=split,
    )
    assert len(rank_state_dicts(str(out))) == tp * pp
    images, logits = run_logits(name)
    model = VitClassificationModel.restore_from(str(out))
    with torch.no_grad():
        got = model(images).float()  # a bf16 model gives bf16 logits, as NeMo's does
    assert torch.allclose(got, logits, atol=1e-5, rtol=0), float((got - logits).abs().max())


@pytest.mark.parametrize("name", RUNS)
def test_inspect_reads_the_run(name: str) -> None:
    info = inspect(str(run_dir(name) / "checkpoints"))
    expected = run_expected(name)
    assert (info["tp"], info["step"]) == (expected["tp"], expected["steps"])
    assert info["checkpoint"] == expected["checkpoint"]
