"""Every user error of the community import/export is one CkptError naming the file at fault."""

from __future__ import annotations

import json
import os

import pytest
import torch
from community_helpers import make_hf, make_timm_reference, timm_hub_config, write_timm_folder
from safetensors.torch import load_file, save_file

from ckptcore.community import export_hf, import_hf
from ckptcore.errors import CkptError
from ckptcore.sample import vit_config, write_nemo

HF = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_labels=5,
)
TIMM = dict(embed_dim=32, depth=2, num_heads=4, img_size=16, patch_size=4, num_classes=5)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("hf") / "vit")
    make_hf(folder, seed=0, **HF)
    return folder


def _copy(src: str, dst) -> str:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return str(dst)


def _edit_config(folder: str, **changes) -> str:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _import_error(source: str, tmp_path, **kwargs) -> CkptError:
    dest = tmp_path / "out.nemo"
    with pytest.raises(CkptError) as info:
        import_hf(source, str(dest), **kwargs)
    assert not dest.exists(), "a failed import left a destination behind"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.nemo")] == []
    return info.value


# --------------------------------------------------------------------------- missing files


def test_missing_config_json(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    os.unlink(os.path.join(folder, "config.json"))
    err = _import_error(folder, tmp_path)
    assert err.path == os.path.join(folder, "config.json")
    assert "config.json not found" in str(err)


def test_missing_weights(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    os.unlink(os.path.join(folder, "model.safetensors"))
    err = _import_error(folder, tmp_path)
    assert err.path == folder and "model.safetensors" in err.problem


def test_source_is_not_a_folder(hf_folder, tmp_path):
    err = _import_error(os.path.join(hf_folder, "model.safetensors"), tmp_path)
    assert "not a folder" in str(err)


def test_corrupt_safetensors(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    err = _import_error(folder, tmp_path)
    assert err.path == path and "header" in err.problem


# --------------------------------------------------------------------------- unsupported models


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model_type": "deit"}, "model_type 'deit'"),
        ({"architectures": ["ViTForMaskedImageModeling"]}, "ViTForMaskedImageModeling"),
        ({"hidden_act": "silu"}, "hidden_act 'silu'"),
        ({"image_size": [16, 20]}, "non-square"),
    ],
)
def test_unsupported_transformers_model(hf_folder, tmp_path, changes, words):
    folder = _copy(hf_folder, tmp_path / "src")
    config = _edit_config(folder, **changes)
    err = _import_error(folder, tmp_path)
    assert err.path == config
    assert words in err.problem


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"architecture": "vit_base_patch16_siglip_224"}, "vit_base_patch16_siglip_224"),
        ({"architecture": "eva02_tiny_patch14_224"}, "eva02_tiny_patch14_224"),
        ({"global_pool": "avg"}, "global_pool 'avg'"),
        ({"model_args": dict(TIMM, global_pool="avg")}, "global pooling"),
        ({"model_args": dict(TIMM, class_token=False)}, "no class token"),
        ({"model_args": dict(TIMM, reg_tokens=4)}, "register tokens"),
        ({"model_args": dict(TIMM, fc_norm=True)}, "fc_norm"),
        ({"model_args": dict(TIMM, qk_norm=True)}, "qk_norm"),
        ({"model_args": dict(TIMM, init_values=1e-5)}, "layer scale"),
        ({"model_args": dict(TIMM, pre_norm=True)}, "pre-norm"),
        ({"model_args": dict(TIMM, act_layer="silu")}, "act_layer 'silu'"),
        ({"model_args": dict(TIMM, mlp_layer="SwiGLU")}, "mlp_layer"),
        ({"model_args": dict(TIMM, img_size=[16, 20])}, "non-square"),
    ],
)
def test_unsupported_timm_config(tmp_path, changes, words):
    folder = str(tmp_path / "src")
    make_timm_reference(folder, seed=0, **TIMM)
    config = _edit_config(folder, **changes)
    err = _import_error(folder, tmp_path)
    assert err.path == config
    assert words in err.problem


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"reg_token": (1, 4, 32)}, "register tokens"),
        ({"dist_token": (1, 1, 32), "head_dist.weight": (5, 32)}, "distill"),
        ({"fc_norm.weight": (32,)}, "fc_norm"),
        ({"blocks.0.ls1.gamma": (32,)}, "layer scale"),
        ({"blocks.1.attn.q_norm.weight": (8,)}, "qk_norm"),
        ({"norm_pre.weight": (32,)}, "pre-norm"),
    ],
)
def test_unsupported_timm_weights(tmp_path, extra, words):
    """Structures visible only in the weights are refused naming the weights file and key."""
    folder = str(tmp_path / "src")
    make_timm_reference(folder, seed=0, **TIMM)
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    sd.update({k: torch.zeros(shape) for k, shape in extra.items()})
    save_file(sd, path)
    err = _import_error(folder, tmp_path)
    assert err.path == path and words in err.problem and err.key in extra


def test_timm_without_class_token_or_head(tmp_path):
    for drop, words in (("cls_token", "no class token"), ("head.weight", "no classification")):
        folder = str(tmp_path / drop)
        make_timm_reference(folder, seed=0, **TIMM)
        path = os.path.join(folder, "model.safetensors")
        sd = load_file(path)
        del sd[drop]
        save_file(sd, path)
        err = _import_error(folder, tmp_path)
        assert err.path == path and words in err.problem


def test_unknown_config_kind(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    config = _edit_config(folder, model_type=None, architectures=None)
    err = _import_error(folder, tmp_path)
    assert err.path == config and "source_kind" in err.problem


def test_source_kind_override(tmp_path):
    folder = str(tmp_path / "src")
    make_timm_reference(folder, seed=0, **TIMM)
    err = _import_error(folder, tmp_path, source_kind="transformers")
    assert err.path.endswith("config.json") and "model_type" in err.problem


# --------------------------------------------------------------------------- config vs weights


def test_weights_disagree_with_config_shape(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    config = _edit_config(folder, id2label={str(i): f"L{i}" for i in range(3)}, label2id=None)
    assert config
    err = _import_error(folder, tmp_path)
    assert err.path == os.path.join(folder, "model.safetensors")
    assert err.key == "classifier.weight"
    assert "[5, 32] does not match [3, 32] implied by config.json" in err.problem


def test_weights_lack_a_layer_the_config_implies(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    _edit_config(folder, num_hidden_layers=3)
    err = _import_error(folder, tmp_path)
    assert err.path == os.path.join(folder, "model.safetensors")
    assert err.key.startswith("vit.encoder.layer.2.") and "missing tensor" in err.problem


def test_weights_hold_more_layers_than_the_config(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    _edit_config(folder, num_hidden_layers=1)
    err = _import_error(folder, tmp_path)
    assert err.path == os.path.join(folder, "model.safetensors")
    assert "unexpected tensors" in err.problem and "vit.encoder.layer.1." in err.problem


def test_timm_weights_disagree_with_config(tmp_path):
    folder = str(tmp_path / "src")
    model = make_timm_reference(folder, seed=0, **TIMM)
    write_timm_folder(folder, model, timm_hub_config(dict(TIMM, embed_dim=48, num_heads=4)))
    err = _import_error(folder, tmp_path)
    assert err.path == os.path.join(folder, "model.safetensors")
    assert "implied by config.json" in err.problem


def test_qkv_bias_false_but_weights_have_biases(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "src")
    _edit_config(folder, qkv_bias=False)
    err = _import_error(folder, tmp_path)
    assert err.path == os.path.join(folder, "model.safetensors")
    assert "does not exist" in err.problem


def test_bad_layout_and_kind(hf_folder, tmp_path):
    assert "layout" in str(_import_error(hf_folder, tmp_path, layout="patchify"))
    assert "source_kind" in str(_import_error(hf_folder, tmp_path, source_kind="keras"))


def test_target_tp_must_divide_heads(hf_folder, tmp_path):
    err = _import_error(hf_folder, tmp_path, target_tp=3)
    assert "TP=3" in str(err)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"class_token_length": 8, "finetune": True}, "class_token_length is 8"),
        ({"class_token_length": 1, "finetune": False}, "pretraining head"),
        ({"class_token_length": 1, "finetune": True, "preprocess_layernorm": True}, "preprocess"),
        ({"class_token_length": 1, "finetune": True, "layerscale": True}, "layerscale"),
    ],
)
def test_export_refuses_what_hf_cannot_express(tmp_path, overrides, words):
    nemo = str(tmp_path / "m.nemo")
    write_nemo(nemo, vit_config("tiny", **overrides), tp=2)
    out = tmp_path / "hf"
    with pytest.raises(CkptError) as info:
        export_hf(nemo, str(out))
    assert info.value.path == nemo and words in info.value.problem
    assert not out.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".hf")] == []


def test_export_refuses_non_square(tmp_path):
    nemo = str(tmp_path / "m.nemo")
    cfg = vit_config("tiny", class_token_length=1, finetune=True, img_w=32)
    write_nemo(nemo, cfg)
    with pytest.raises(CkptError, match="non-square") as info:
        export_hf(nemo, str(tmp_path / "hf"))
    assert info.value.path == nemo


def test_export_missing_source(tmp_path):
    with pytest.raises(CkptError) as info:
        export_hf(str(tmp_path / "nope.nemo"), str(tmp_path / "hf"))
    assert "nope.nemo" in str(info.value)
