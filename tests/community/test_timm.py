"""timm ViT (Hub folder format) -> .nemo, on tiny random models (CPU).

Two references:

- ``TimmReference`` (community_helpers): timm ``VisionTransformer``'s eval forward and keys,
  written without importing timm (it matched timm 1.0.31 exactly, max |diff| 0.0). Always runs.
- real timm, when importable. timm 1.0.x imports torchvision at import time (data transforms,
  ``FrozenBatchNorm2d``), and PyPI has no CPU torchvision for torch 2.13.0, so ``load_timm`` lets a
  placeholder torchvision stand in while timm is imported; the ViT code never calls it. Skipped
  when timm (or pillow, which timm.data imports) is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch
from community_helpers import load_timm, make_timm_reference, timm_hub_config, write_timm_folder

from ckptcore.community import import_hf
from ckptcore.model.vit import VitClassificationModel

ATOL = 1e-5

CONFIGS = {
    "d32-l2-p4": dict(
        embed_dim=32, depth=2, num_heads=4, img_size=16, patch_size=4, num_classes=5
    ),
    "d64-l4-p6-r3": dict(
        embed_dim=64, depth=4, num_heads=8, mlp_ratio=3.0, img_size=24, patch_size=6,
        num_classes=4, act_layer="gelu_tanh",
    ),
    "d48-l2-p5-c1-noembedclass": dict(
        embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, img_size=20, patch_size=5,
        in_chans=1, num_classes=3, qkv_bias=False, no_embed_class=True,
    ),
}  # fmt: skip


def _images(args: dict, n: int = 3, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = args["img_size"]
    return torch.randn(n, args.get("in_chans", 3), size, size, generator=g)


def _logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module")
def reference_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    out = {}
    for i, (name, args) in enumerate(CONFIGS.items()):
        folder = str(root / name)
        out[name] = (folder, make_timm_reference(folder, seed=10 + i, **args))
    return out


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_timm_reference(reference_models, tmp_path, name, tp, pp):
    folder, model = reference_models[name]
    images = _images(CONFIGS[name])
    dest = str(tmp_path / "m.nemo")
    report = import_hf(folder, dest, target_tp=tp, target_pp=pp)
    assert report.source_kind == "timm"
    got = _logits(VitClassificationModel.restore_from(dest), images)
    diff = (got - _logits(model, images)).abs().max().item()
    assert diff <= ATOL, f"{name} TP={tp} PP={pp}: max |diff| {diff}"


def test_timm_config_mapping(reference_models, tmp_path):
    folder, _ = reference_models["d64-l4-p6-r3"]
    dest = str(tmp_path / "m.nemo")
    import_hf(folder, dest, layout="linear_encoder")
    model = VitClassificationModel.restore_from(dest)
    cfg = model.cfg
    assert cfg["layernorm_epsilon"] == 1e-6
    assert cfg["openai_gelu"] is True
    assert cfg["ffn_hidden_size"] == 192
    assert cfg["class_token_length"] == 1 and cfg["finetune"] is True


def test_timm_pytorch_model_bin(tmp_path):
    args = CONFIGS["d32-l2-p4"]
    torch.manual_seed(0)
    folder = str(tmp_path / "bin")
    model = make_timm_reference(str(tmp_path / "st"), seed=5, **args)
    write_timm_folder(folder, model, timm_hub_config(args), weights="bin")
    assert os.path.exists(os.path.join(folder, "pytorch_model.bin"))
    dest = str(tmp_path / "m.nemo")
    import_hf(folder, dest, target_tp=2)
    images = _images(args)
    got = _logits(VitClassificationModel.restore_from(dest), images)
    assert (got - _logits(model, images)).abs().max() <= ATOL


# --------------------------------------------------------------------------- real timm


@pytest.fixture(scope="module")
def timm_module():
    timm = load_timm()
    if timm is None:
        pytest.skip("timm is not installed (pip install --no-deps timm pillow)")
    return timm


@pytest.fixture(scope="module")
def timm_models(timm_module, tmp_path_factory):
    """Real timm models saved with timm's own ``save_for_hf`` (config.json + model.safetensors)."""
    from community_helpers import randomize

    root = tmp_path_factory.mktemp("realtimm")
    out = {}
    for i, (name, args) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = timm_module.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
        randomize(model, 20 + i)
        folder = str(root / name)
        timm_module.models.save_for_hf(model, folder, model_args=args, safe_serialization=True)
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_real_timm(timm_models, tmp_path, name, tp, pp):
    folder, model = timm_models[name]
    images = _images(CONFIGS[name])
    dest = str(tmp_path / "m.nemo")
    import_hf(folder, dest, target_tp=tp, target_pp=pp)
    got = _logits(VitClassificationModel.restore_from(dest), images)
    diff = (got - _logits(model, images)).abs().max().item()
    assert diff <= ATOL, f"{name} TP={tp} PP={pp}: max |diff| {diff}"
