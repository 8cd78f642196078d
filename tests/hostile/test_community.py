"""``ckpt import-hf`` on bad Hub-style folders: one line naming the file, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hostile_helpers import assert_refused, copy, run_cli
from safetensors.torch import load_file, save_file


@pytest.fixture
def hf(templates, tmp_path) -> Path:
    return copy(templates.hf, tmp_path / "vit")


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    return path


def refuse(folder: Path, out: Path, expected: str, *extra: str) -> None:
    assert_refused(["import-hf", folder, out, *extra], expected, out, (folder,))


def test_missing_config_json(hf, out):
    (hf / "config.json").unlink()
    refuse(hf, out, f"{hf}/config.json: config.json not found")


def test_config_json_is_not_json(hf, out):
    (hf / "config.json").write_text("{not json")
    refuse(
        hf,
        out,
        f"{hf}/config.json: not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)",
    )


def test_missing_weights(hf, out):
    (hf / "model.safetensors").unlink()
    refuse(
        hf,
        out,
        f"{hf}: no weights: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json",
    )


@pytest.mark.parametrize(
    "changes, problem",
    [
        (
            {"model_type": "deit"},
            "model_type: model_type 'deit' is not supported: only transformers ViT "
            "(ViTForImageClassification, model_type 'vit') converts",
        ),
        (
            {"architectures": ["ViTForMaskedImageModeling"]},
            "architectures: architectures ['ViTForMaskedImageModeling'] is not supported: only "
            "ViTForImageClassification converts",
        ),
        (
            {"hidden_act": "silu"},
            "hidden_act: hidden_act 'silu' is not supported (supported: gelu, gelu_python, "
            "gelu_new, gelu_pytorch_tanh, gelu_fast, quick_gelu, relu2)",
        ),
        (
            {"model_type": None, "architectures": None},
            "neither a transformers config (model_type, architectures) nor a timm one "
            "(architecture, pretrained_cfg, model_args); pass source_kind to choose",
        ),
    ],
    ids=["deit", "mim", "silu", "unknown"],
)
def test_unsupported_architecture(hf, out, changes, problem):
    config = edit_config(hf, **changes)
    refuse(hf, out, f"{config}: {problem}")


def test_config_and_weights_disagree_on_the_classes(hf, out):
    edit_config(hf, id2label={"0": "a", "1": "b", "2": "c"}, label2id=None)
    refuse(
        hf,
        out,
        f"{hf}/model.safetensors: classifier.weight: shape [10, 64] does not match [3, 64] "
        "implied by config.json (config and weights disagree)",
    )


def test_config_and_weights_disagree_on_the_layers(hf, out):
    edit_config(hf, num_hidden_layers=3)
    refuse(
        hf,
        out,
        f"{hf}/model.safetensors: vit.encoder.layer.2.layernorm_before.weight: missing tensor "
        "of shape [64] implied by config.json (config and weights disagree)",
    )


def test_corrupt_safetensors_header(hf, out):
    path = hf / "model.safetensors"
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    size = path.stat().st_size
    refuse(
        hf, out, f"{path}: corrupt safetensors header size 1000000000000 (file has {size} bytes)"
    )


def test_truncated_safetensors(hf, out):
    path = hf / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    refuse(
        hf,
        out,
        f"{path}: vit.encoder.layer.1.output.dense.weight: truncated: tensor data runs past the "
        "end of the file",
    )


def test_unsafe_shard_name_in_an_index(hf, out):
    tensors = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    index = {"weight_map": {k: "../../../etc/passwd" for k in tensors}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    first = next(iter(tensors))
    refuse(
        hf,
        out,
        f"{hf}/model.safetensors.index.json: {first}: unsafe or invalid shard file name "
        "'../../../etc/passwd'",
    )


def test_target_tp_not_dividing_heads(hf, out):
    refuse(hf, out, f"{hf}: target TP=3 does not divide num_attention_heads=4", "--target-tp", "3")


def test_nan_in_hub_weights(hf, out):
    path = hf / "model.safetensors"
    tensors = load_file(str(path))
    tensors["vit.layernorm.weight"][0] = torch.nan
    save_file(tensors, str(path))
    refuse(
        hf,
        out,
        f"{hf}: model.backbone.transformer.final_layernorm.weight: holds NaN or Inf values "
        "(pass --allow-nonfinite to keep them)",
    )


def test_good_folder_imports(hf, out):
    rc, _, err = run_cli("import-hf", hf, out)
    assert rc == 0, err
