"""transformers ViTForImageClassification -> .nemo -> transformers, on tiny random models (CPU)."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch
from community_helpers import (
    hf_logits,
    make_hf,
    read_safetensors,
    safetensors_to_bin,
    shard_safetensors,
)

from ckptcore.api import load_state_dict
from ckptcore.community import export_hf, import_hf, open_community
from ckptcore.errors import CkptError
from ckptcore.model.tp_forward import forward_tensor_parallel
from ckptcore.model.vit import BACKBONE, VitClassificationModel
from ckptcore.sample import vit_config, write_nemo
from ckptcore.sources import open_checkpoint

ATOL = 1e-5

CONFIGS = {
    "h32-l2-p4": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=5,
    ),
    "h64-l4-p6-gelu_new": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=96,
        image_size=24,
        patch_size=6,
        num_labels=3,
        hidden_act="gelu_new",
        layer_norm_eps=1e-6,
    ),
    "h24-l2-p5-c1-noqkvbias": dict(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        image_size=20,
        patch_size=5,
        num_channels=1,
        num_labels=7,
        qkv_bias=False,
        hidden_act="quick_gelu",
    ),
}


def _images(cfg: dict, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = cfg["image_size"]
    return torch.randn(n, cfg.get("num_channels", 3), size, size, generator=g)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """{name: (folder, model)} for every tiny configuration."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        folder = str(root / name)
        out[name] = (folder, make_hf(folder, seed=i, **cfg))
    return out


def _restore_logits(nemo: str, images: torch.Tensor) -> torch.Tensor:
    model = VitClassificationModel.restore_from(nemo)
    with torch.no_grad():
        return model(images)


# --------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_models, tmp_path, name, tp, pp):
    folder, model = hf_models[name]
    images = _images(CONFIGS[name])
    dest = str(tmp_path / "m.nemo")
    report = import_hf(folder, dest, target_tp=tp, target_pp=pp)
    assert (report.source_kind, report.layout.target_tp, report.layout.target_pp) == ("hf", tp, pp)
    diff = (_restore_logits(dest, images) - hf_logits(model, images)).abs().max().item()
    assert diff <= ATOL, f"{name} TP={tp} PP={pp}: max |diff| {diff}"


def test_linear_encoder_layout_logits(hf_models, tmp_path):
    folder, model = hf_models["h64-l4-p6-gelu_new"]
    images = _images(CONFIGS["h64-l4-p6-gelu_new"])
    dest = str(tmp_path / "m.nemo")
    import_hf(folder, dest, target_tp=2, target_pp=2, layout="linear_encoder")
    config, sd = load_state_dict(dest)
    assert config["patch_embedding"] == "linear_encoder"
    assert BACKBONE + "linear_encoder.bias" in sd and BACKBONE + "conv1.weight" not in sd
    diff = (_restore_logits(dest, images) - hf_logits(model, images)).abs().max().item()
    assert diff <= ATOL


def test_config_mapping(hf_models, tmp_path):
    folder, _ = hf_models["h64-l4-p6-gelu_new"]
    dest = str(tmp_path / "m.nemo")
    import_hf(folder, dest)
    config, _ = load_state_dict(dest)
    assert config["class_token_length"] == 1
    assert config["finetune"] is True
    assert config["layernorm_epsilon"] == 1e-6
    assert config["openai_gelu"] is True and config["activation"] == "gelu"
    assert config["megatron_legacy"] is False
    assert config["precision"] == 32
    assert (config["img_h"], config["img_w"], config["patch_dim"]) == (24, 24, 6)
    assert (config["num_layers"], config["num_attention_heads"], config["num_classes"]) == (4, 8, 3)
    assert config["target"].endswith("MegatronVitClassificationModel")
    assert "optim" in config and "data" in config
    assert "patch_embedding" not in config


def test_tensor_parallel_forward_of_imported_shards(hf_models, tmp_path):
    """Rank files of a TP=2 import, run the tensor-parallel way, give transformers' logits."""
    name = "h32-l2-p4"
    folder, model = hf_models[name]
    images = _images(CONFIGS[name])
    dest = str(tmp_path / "tp2.nemo")
    import_hf(folder, dest, target_tp=2)
    with open_checkpoint(dest) as ck:
        assert (ck.tp, ck.pp) == (2, 1)
        shards = []
        for r in range(2):
            rank = ck.ranks[(r, 0)]
            shards.append({k: None if v is None else rank.tensor(k) for k, v in rank.state.items()})
        logits = forward_tensor_parallel(ck.config, shards, images)
    diff = (logits - hf_logits(model, images)).abs().max().item()
    assert diff <= ATOL


def test_lazy_checkpoint_reads_only_on_demand(hf_models):
    folder, _ = hf_models["h32-l2-p4"]
    with open_community(folder) as ck:
        assert ck.kind == "hf" and (ck.tp, ck.pp) == (1, 1)
        rank = ck.ranks[(0, 0)]
        qkv = BACKBONE + "transformer.layers.0.self_attention.query_key_value.weight"
        assert rank.state[qkv].shape == (96, 32)
        assert rank.tensor(qkv).shape == (96, 32)
        assert any("folded" in n for n in ck.notes)


# --------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("form", ["pytorch_model.bin", "sharded safetensors", "memory:// URL"])
def test_weight_file_forms(tmp_path, form):
    cfg = CONFIGS["h32-l2-p4"]
    folder = str(tmp_path / "src")
    model = make_hf(folder, seed=7, **cfg)
    source = folder
    if form == "pytorch_model.bin":
        safetensors_to_bin(folder)
    elif form == "sharded safetensors":
        shard_safetensors(folder, 3)
    else:
        fs = fsspec.filesystem("memory")
        source = f"memory://hf-{os.getpid()}-{id(tmp_path)}"
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                fs.pipe(source[len("memory://") :] + "/" + name, f.read())
    dest = str(tmp_path / "m.nemo")
    import_hf(source, dest, target_tp=2)
    images = _images(cfg)
    assert (_restore_logits(dest, images) - hf_logits(model, images)).abs().max() <= ATOL


# --------------------------------------------------------------------------- round trips


def test_round_trip_conv1_documented_bias_exception(hf_models, tmp_path):
    """HF -> .nemo (conv1, TP=2 PP=2) -> HF: every tensor equal except the patch bias, which is
    exported as zeros with the original bias folded into the patch rows of the position table."""
    from transformers import ViTForImageClassification

    name = "h32-l2-p4"
    folder, model = hf_models[name]
    nemo = str(tmp_path / "m.nemo")
    import_hf(folder, nemo, target_tp=2, target_pp=2)
    out = str(tmp_path / "back")
    info = export_hf(nemo, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert info["layout"] == "conv1" and info["notes"]

    a = read_safetensors(os.path.join(folder, "model.safetensors"))
    b = read_safetensors(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)
    bias = "vit.embeddings.patch_embeddings.projection.bias"
    pos = "vit.embeddings.position_embeddings"
    for key in a:
        if key not in (bias, pos):
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(b[bias], torch.zeros_like(a[bias]))
    assert torch.equal(b[pos][:, 0], a[pos][:, 0])
    assert torch.equal(b[pos][:, 1:], a[pos][:, 1:] + a[bias])

    back, info = ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    images = _images(CONFIGS[name])
    assert (hf_logits(back.eval(), images) - hf_logits(model, images)).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["h32-l2-p4", "h64-l4-p6-gelu_new"])
def test_round_trip_linear_encoder_is_exact(hf_models, tmp_path, name):
    from transformers import ViTConfig

    folder, _ = hf_models[name]
    nemo = str(tmp_path / "m.nemo")
    import_hf(folder, nemo, target_tp=4, target_pp=2, layout="linear_encoder")
    out = str(tmp_path / "back")
    export_hf(nemo, out)
    a = read_safetensors(os.path.join(folder, "model.safetensors"))
    b = read_safetensors(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ca, cb = ViTConfig.from_pretrained(folder), ViTConfig.from_pretrained(out)
    for attr in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "num_labels",
    ):  # fmt: skip
        assert getattr(ca, attr) == getattr(cb, attr), attr


def test_round_trip_without_qkv_bias(hf_models, tmp_path):
    """qkv_bias False imports as zero q/k/v biases and exports as qkv_bias True with zeros."""
    from transformers import ViTForImageClassification

    name = "h24-l2-p5-c1-noqkvbias"
    folder, model = hf_models[name]
    nemo = str(tmp_path / "m.nemo")
    import_hf(folder, nemo)
    out = str(tmp_path / "back")
    export_hf(nemo, out)
    back = ViTForImageClassification.from_pretrained(out).eval()
    assert back.config.qkv_bias is True
    images = _images(CONFIGS[name])
    assert (hf_logits(back, images) - hf_logits(model, images)).abs().max() <= 1e-6


def _legacy_state(sd: dict, heads: int, head_dim: int) -> dict:
    """Rewrite per-head q/k/v rows [n, 3, hn] as megatron_legacy's [3, n, hn]."""
    out = dict(sd)
    for key, value in sd.items():
        if "query_key_value" in key and isinstance(value, torch.Tensor):
            rest = value.shape[1:]
            out[key] = value.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(value.shape)
    return out


def test_export_megatron_legacy_nemo(hf_models, tmp_path):
    """A megatron_legacy .nemo (block q/k/v rows, TP=2 strided) exports to the same HF model."""
    from transformers import ViTForImageClassification

    name = "h32-l2-p4"
    folder, model = hf_models[name]
    nemo = str(tmp_path / "m.nemo")
    import_hf(folder, nemo)
    config, sd = load_state_dict(nemo)
    legacy_cfg = dict(config, megatron_legacy=True)
    legacy = str(tmp_path / "legacy.nemo")
    write_nemo(legacy, legacy_cfg, tp=2, state_dict=_legacy_state(sd, 4, 8))
    images = _images(CONFIGS[name])
    assert (_restore_logits(legacy, images) - hf_logits(model, images)).abs().max() <= ATOL
    out = str(tmp_path / "back")
    info = export_hf(legacy, out)
    assert info["megatron_legacy"] is True
    back = ViTForImageClassification.from_pretrained(out).eval()
    assert (hf_logits(back, images) - hf_logits(model, images)).abs().max() <= 1e-6
    a = read_safetensors(os.path.join(folder, "model.safetensors"))
    b = read_safetensors(os.path.join(out, "model.safetensors"))
    q = "vit.encoder.layer.1.attention.attention.query.weight"
    assert torch.equal(a[q], b[q])


@pytest.mark.parametrize("layout", ["conv1", "linear_encoder"])
def test_export_ckptcore_sample_nemo(tmp_path, layout):
    """A NeMo-made (sample) finetune .nemo at TP=2 PP=2 exports to an equivalent HF model."""
    from transformers import ViTForImageClassification

    extra = {"patch_embedding": "linear_encoder"} if layout == "linear_encoder" else {}
    cfg = vit_config(
        "tiny", hidden=32, heads=4, ffn=64, layers=2, classes=6, class_token_length=1,
        finetune=True, **extra,
    )  # fmt: skip
    nemo = str(tmp_path / "s.nemo")
    write_nemo(nemo, cfg, tp=2, pp=2, seed=3)
    out = str(tmp_path / "hf")
    export_hf(nemo, out)
    back = ViTForImageClassification.from_pretrained(out).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = _restore_logits(nemo, images)
    assert (hf_logits(back, images) - ref).abs().max() <= ATOL


def test_export_refuses_existing_folder_unless_overwrite(hf_models, tmp_path):
    folder, _ = hf_models["h32-l2-p4"]
    nemo = str(tmp_path / "m.nemo")
    import_hf(folder, nemo)
    out = tmp_path / "back"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CkptError, match="already exists"):
        export_hf(nemo, str(out))
    assert (out / "keep.txt").exists()
    export_hf(nemo, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]
    assert leftovers == []


def test_import_refuses_existing_destination(hf_models, tmp_path):
    folder, _ = hf_models["h32-l2-p4"]
    dest = tmp_path / "m.nemo"
    dest.write_bytes(b"old")
    with pytest.raises(CkptError, match="already exists"):
        import_hf(folder, str(dest))
    assert dest.read_bytes() == b"old"
    import_hf(folder, str(dest), overwrite=True)
    assert dest.stat().st_size > 3


def test_import_precision_bf16(hf_models, tmp_path):
    folder, model = hf_models["h32-l2-p4"]
    dest = str(tmp_path / "bf16.nemo")
    report = import_hf(folder, dest, precision="bf16")
    config, sd = load_state_dict(dest)
    assert report.layout.precision == "bf16" and config["precision"] == "bf16"
    assert config["megatron_amp_O2"] is True
    assert {v.dtype for v in sd.values() if isinstance(v, torch.Tensor)} == {torch.bfloat16}


def test_pooler_weights_are_ignored_with_a_note(tmp_path):
    from safetensors.torch import save_file

    cfg = CONFIGS["h32-l2-p4"]
    folder = str(tmp_path / "src")
    model = make_hf(folder, seed=3, **cfg)
    path = os.path.join(folder, "model.safetensors")
    sd = read_safetensors(path)
    sd["vit.pooler.dense.weight"] = torch.zeros(32, 32)
    sd["vit.pooler.dense.bias"] = torch.zeros(32)
    save_file(sd, path, metadata={"format": "pt"})
    dest = str(tmp_path / "m.nemo")
    report = import_hf(folder, dest)
    assert any("vit.pooler.dense.weight" in n for n in report.layout.notes)
    images = _images(cfg)
    assert (_restore_logits(dest, images) - hf_logits(model, images)).abs().max() <= ATOL


def test_bf16_source_keeps_its_precision(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    folder = str(tmp_path / "src")
    model = ViTForImageClassification(ViTConfig(**CONFIGS["h32-l2-p4"])).eval()
    model.to(torch.bfloat16).save_pretrained(folder)
    dest = str(tmp_path / "m.nemo")
    report = import_hf(folder, dest, target_tp=2)
    config, sd = load_state_dict(dest)
    assert report.layout.precision == "bf16" and config["megatron_amp_O2"] is True
    assert {v.dtype for v in sd.values() if isinstance(v, torch.Tensor)} == {torch.bfloat16}
    out = str(tmp_path / "back")
    info = export_hf(dest, out)
    assert info["dtype"] == "bfloat16"
    assert read_safetensors(os.path.join(out, "model.safetensors"))["classifier.weight"].dtype == (
        torch.bfloat16
    )


def test_verify_import_compares_the_folder_with_the_nemo(hf_models, tmp_path):
    """``verify_import``: the mapped folder and its import agree; the import of a model with the
    same shapes and other weights does not (``passed`` False, the difference reported)."""
    from ckptcore.community.api import verify_import

    name = next(iter(CONFIGS))
    folder, _ = hf_models[name]
    mine = str(tmp_path / "mine.nemo")
    import_hf(folder, mine, target_tp=2)
    report = verify_import(folder, mine, images=2)
    assert report.passed and report.max_abs_diff <= ATOL and report.images == 2
    other = str(tmp_path / "other")
    make_hf(other, seed=99, **CONFIGS[name])
    theirs = str(tmp_path / "theirs.nemo")
    import_hf(other, theirs, target_tp=2)
    report = verify_import(folder, theirs, images=2)
    assert not report.passed and report.max_abs_diff > ATOL
