"""NeMo 1.23-era ViT files: ``linear_encoder`` patch embedding, no layout key in the config.

NeMo 1.23 cannot be built here, so its files are made from real NeMo 2.3.2 files by NeMo 1.23's
documented layout (``real_nemo.write_nemo_123``): the same config, ``conv1`` replaced by a
``linear_encoder`` over ``(p1 p2 c)``-flattened patches with a zero bias, which computes the same.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import rank_state_dicts
from real_nemo import (
    FIXTURES,
    TRAINING,
    conv1_to_linear_encoder,
    rank_files,
    read_nemo,
    run_logits,
    write_nemo_123,
)

from ckptcore.api import convert, inspect, verify
from ckptcore.model.vit import VitClassificationModel

ENCODER = "model.backbone.linear_encoder.weight"


def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    data = json.loads((FIXTURES / "tiny_vit_tp1_forward.json").read_text())
    return torch.tensor(data["input"]), torch.tensor(data["logits"])


@pytest.fixture(params=["tiny_vit_tp1.nemo", "tiny_vit_tp2.nemo"])
def nemo_123(request, tmp_path):
    path = tmp_path / f"v123-{request.param}"
    return path, write_nemo_123(FIXTURES / request.param, path)


def _logits(path) -> torch.Tensor:
    model = VitClassificationModel.restore_from(str(path))
    assert model.opts.patch_embedding == "linear_encoder"
    with torch.no_grad():
        return model(_reference()[0])


def _config_keys(path) -> list[str]:
    return list(yaml.safe_load(read_nemo(path)[0]))


def test_inspect(nemo_123) -> None:
    path, config = nemo_123
    info = inspect(str(path))
    assert info["tp"] == config["tensor_model_parallel_size"]
    assert info["parameters"] == 110_026 + 64  # conv1's weights, plus linear_encoder's bias


def test_restore_gives_the_reference_logits(nemo_123) -> None:
    path, _ = nemo_123
    images, logits = _reference()
    assert torch.allclose(_logits(path), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target_tp", [1, 2])
def test_reshard_keeps_the_layout_and_the_config(nemo_123, tmp_path, target_tp: int) -> None:
    path, config = nemo_123
    out = tmp_path / "out.nemo"
    convert(str(path), str(out), target_tp=target_tp)
    shards = rank_state_dicts(str(out))
    assert len(shards) == target_tp
    assert all(ENCODER in sd and "model.backbone.conv1.weight" not in sd for sd in shards.values())
    # the output config has no key NeMo does not write
    assert _config_keys(out) == list(config)
    assert torch.allclose(_logits(out), _reference()[1], atol=1e-5, rtol=0)
    report = verify(str(path), str(out))
    assert report.passed and report.method == "same-weights"


def test_training_folder_in_the_123_layout_converts(tmp_path) -> None:
    run = "tp2_a"
    folder = tmp_path / "checkpoints"
    for rank_file in rank_files(run):
        ck = torch.load(rank_file, weights_only=False)  # a committed fixture written by NeMo
        ck["state_dict"] = conv1_to_linear_encoder(ck["state_dict"])
        ck["hyper_parameters"].cfg.nemo_version = "1.23.0"
        dest = folder / rank_file.parent.name / rank_file.name
        dest.parent.mkdir(parents=True)
        torch.save(ck, dest)
    assert inspect(str(folder))["tp"] == 2
    out = tmp_path / "tp1pp2.nemo"
    convert(str(folder), str(out), target_tp=1, target_pp=2)
    assert ENCODER in rank_state_dicts(str(out))[(0, 0)]
    written = yaml.safe_load(read_nemo(out)[0])
    assert "patch_embedding" not in written
    assert set(written) == set(yaml.safe_load(read_nemo(TRAINING / run / f"{run}.nemo")[0]))
    images, logits = run_logits(run)
    model = VitClassificationModel.restore_from(str(out))
    with torch.no_grad():
        assert torch.allclose(model(images), logits, atol=1e-5, rtol=0)


def test_saved_model_keeps_the_config_as_written(nemo_123, tmp_path) -> None:
    path, config = nemo_123
    model = VitClassificationModel.restore_from(str(path))
    assert list(model.cfg) == list(config)  # merged to TP=1, and no key added
    out = tmp_path / "saved.nemo"
    model.save_to(str(out))
    assert _config_keys(out) == list(config)
    assert ENCODER in rank_state_dicts(str(out))[(0, 0)]
