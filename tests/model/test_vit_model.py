"""The pure-torch ViT against the real NeMo 2.3.2 fixtures, and its tensor-parallel forward."""

from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict

import pytest
import torch
import yaml
from real_nemo import FIXTURES

from ckptcore.errors import CkptError
from ckptcore.model.tp_forward import forward_tensor_parallel
from ckptcore.model.vit import VitClassificationModel, expected_shapes, vit_dims, vit_options

ATOL = 1e-5


# ------------------------------------------------------------------------------------ helpers


def _read_nemo(name: str) -> tuple[dict, list[OrderedDict]]:
    """(model_config, [state dict per TP rank]) of a fixture .nemo."""
    with tarfile.open(FIXTURES / name, "r:") as tar:
        config = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        names = sorted(n for n in tar.getnames() if n.endswith("model_weights.ckpt"))
        shards = [
            torch.load(io.BytesIO(tar.extractfile(n).read()), weights_only=True) for n in names
        ]
    return config, shards


@pytest.fixture(scope="module")
def tp1() -> tuple[dict, OrderedDict]:
    config, shards = _read_nemo("tiny_vit_tp1.nemo")
    assert len(shards) == 1
    return config, shards[0]


@pytest.fixture(scope="module")
def tp2() -> tuple[dict, list[OrderedDict]]:
    config, shards = _read_nemo("tiny_vit_tp2.nemo")
    assert len(shards) == 2
    return config, shards


@pytest.fixture(scope="module")
def forward_json() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input images, NeMo TP1 logits, NeMo TP2 logits)."""
    one = json.loads((FIXTURES / "tiny_vit_tp1_forward.json").read_text())
    two = json.loads((FIXTURES / "tiny_vit_tp2_forward.json").read_text())
    return torch.tensor(one["input"]), torch.tensor(one["logits"]), torch.tensor(two["logits"])


def _shape_list(state: dict) -> list[tuple[str, tuple[int, ...] | None]]:
    return [(k, None if v is None else tuple(v.shape)) for k, v in state.items()]


def _split_dim(key: str) -> int | None:
    if key.endswith(("query_key_value.weight", "query_key_value.bias")):
        return 0
    if key.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias")):
        return 0
    if key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return 1
    return None


def _split(state: dict, tp: int, legacy: bool = False) -> list[OrderedDict]:
    """NeMo's change-partitions split; legacy q/k/v uses the strided rule (rank r: [Q_r;K_r;V_r])."""
    shards = [OrderedDict() for _ in range(tp)]
    for key, value in state.items():
        dim = None if value is None else _split_dim(key)
        if value is None or dim is None:
            pieces = [value if value is None else value.clone() for _ in range(tp)]
        elif legacy and "query_key_value" in key:
            chunks = torch.chunk(value, 3 * tp, dim=0)
            pieces = [torch.cat([chunks[r], chunks[r + tp], chunks[r + 2 * tp]]) for r in range(tp)]
        else:
            pieces = [c.clone() for c in torch.chunk(value, tp, dim=dim)]
        for shard, piece in zip(shards, pieces, strict=True):
            shard[key] = piece
    return shards


def _to_block_layout(shard: dict, heads: int, head_dim: int) -> OrderedDict:
    """Rewrite a shard's q/k/v rows from per-head [np, 3, hn] to block [3, np, hn]."""
    out = OrderedDict(shard)
    for key, value in shard.items():
        if value is not None and "query_key_value" in key:
            rest = value.shape[1:]
            out[key] = value.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(value.shape)
    return out


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _tiny_config(**overrides) -> dict:
    config = {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "ffn_hidden_size": 64,
        "num_layers": 2,
        "patch_dim": 4,
        "img_h": 8,
        "img_w": 12,
        "num_channels": 3,
        "num_classes": 5,
        "kv_channels": None,
        "layernorm_epsilon": 1e-5,
        "apply_query_key_layer_scaling": True,
    }
    config.update(overrides)
    return config


def _images(config: dict, seed: int = 1, batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = config.get("num_channels", 3)
    return torch.randn(batch, c, config["img_h"], config["img_w"], generator=gen)


# ------------------------------------------------------------------------------ NeMo fixtures


def test_state_dict_matches_nemo_file(tp1) -> None:
    config, state = tp1
    model = VitClassificationModel(config)
    model.load_state_dict(state, strict=True)
    assert _shape_list(model.state_dict()) == _shape_list(state)
    assert sum(v is None for v in model.state_dict().values()) == 8
    for key, value in model.state_dict().items():
        if value is not None:
            assert torch.equal(value, state[key]), key


def test_state_dict_order_matches_saved_listing(tp1) -> None:
    config, _ = tp1
    listing = json.loads((FIXTURES / "tiny_vit_tp1_state_dict.json").read_text())
    saved = [(e["key"], tuple(e["shape"]) if "shape" in e else None) for e in listing]
    assert _shape_list(VitClassificationModel(config).state_dict()) == saved


def test_forward_matches_nemo_logits(tp1, forward_json) -> None:
    config, state = tp1
    images, logits, _ = forward_json
    model = VitClassificationModel(config)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(images)
    assert out.shape == logits.shape == (2, 10)
    torch.testing.assert_close(out, logits, atol=ATOL, rtol=0)


def test_pretraining_head_is_tanh(tp1, forward_json) -> None:
    """The fixture pins the head: dense_out(tanh(dense_in(x))), not relu, not linear."""
    config, state = tp1
    images, logits, _ = forward_json
    model = VitClassificationModel(config)
    model.load_state_dict(state, strict=True)
    head = model.model.head
    with torch.no_grad():
        features = model.model.backbone(images)
        relu = head.dense_out(torch.relu(head.dense_in(features)))
    assert (relu - logits).abs().max() > 1e-2


def test_load_without_extra_state_entries(tp1) -> None:
    config, state = tp1
    stripped = {k: v for k, v in state.items() if v is not None}
    model = VitClassificationModel(config)
    model.load_state_dict(stripped, strict=True)
    assert _shape_list(model.state_dict()) == _shape_list(state)


def test_low_precision_runs(tp1, forward_json) -> None:
    config, state = tp1
    images, logits, _ = forward_json
    for dtype, tol in ((torch.bfloat16, 0.25), (torch.float16, 0.05)):
        model = VitClassificationModel(config, dtype=dtype)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            out = model(images)
        assert out.dtype == dtype
        assert (out.float() - logits).abs().max() < tol


def test_tensor_parallel_forward_matches_nemo(tp2, forward_json) -> None:
    config, shards = tp2
    images, logits1, logits2 = forward_json
    out = forward_tensor_parallel(config, shards, images)
    torch.testing.assert_close(out, logits2, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, logits1, atol=ATOL, rtol=0)


def test_tensor_parallel_forward_rejects_block_qkv(tp2, forward_json) -> None:
    config, shards = tp2
    images, _, logits2 = forward_json
    dims = vit_dims(config)
    block = [_to_block_layout(s, dims.heads // 2, dims.head_dim) for s in shards]
    out = forward_tensor_parallel(config, block, images)
    assert (out - logits2).abs().max() > 1e-3


def test_split_helper_reproduces_nemo_split(tp1, tp2) -> None:
    _, state = tp1
    _, shards = tp2
    for mine, nemo in zip(_split(state, 2), shards, strict=True):
        assert _shape_list(mine) == _shape_list(nemo)
        for key, value in nemo.items():
            if value is not None:
                assert torch.equal(mine[key], value), key


def test_expected_shapes_match_fixture_files(tp1, tp2) -> None:
    config1, state = tp1
    config2, shards = tp2
    assert list(expected_shapes(config1).items()) == _shape_list(state)
    for shard in shards:
        assert list(expected_shapes(config2, tp=2).items()) == _shape_list(shard)
        assert list(expected_shapes(config1, tp=2).items()) == _shape_list(shard)


def test_tensor_parallel_checks_shards(tp2, forward_json) -> None:
    config, shards = tp2
    images = forward_json[0]
    missing = [OrderedDict(s) for s in shards]
    del missing[1]["model.backbone.transformer.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(CkptError, match="missing tensor"):
        forward_tensor_parallel(config, missing, images)
    with pytest.raises(CkptError, match="expected shape"):
        forward_tensor_parallel(config, shards[:1], images)  # TP2 shards read as TP1
    changed = [OrderedDict(s) for s in shards]
    key = "model.backbone.transformer.final_layernorm.bias"
    changed[1][key] = changed[1][key] + 1.0
    with pytest.raises(CkptError, match="differs from rank 0"):
        forward_tensor_parallel(config, changed, images)
    with pytest.raises(CkptError, match="images must be"):
        forward_tensor_parallel(config, shards, images[:, :, :8])


# ------------------------------------------------------------------------ random small configs

VARIANTS = {
    "default": {},
    "finetune_head": {"finetune": True},
    "one_class_token": {"class_token_length": 1},
    "linear_encoder": {"patch_embedding": "linear_encoder"},
    "openai_gelu": {"openai_gelu": True},
    "fused_bias_gelu": {"bias_activation_fusion": True},
    "approx_gelu": {"activation": "approx-gelu"},
    "kv_channels": {"kv_channels": 6},
    "megatron_legacy": {"megatron_legacy": True},
    "legacy_kv_channels_finetune": {"megatron_legacy": True, "kv_channels": 5, "finetune": True},
    "learned_parameters": {"position_embedding_type": "learned_parameters"},
    "preprocess_ln_layerscale": {"preprocess_layernorm": True, "layerscale": True},
    "no_qk_layer_scaling": {"apply_query_key_layer_scaling": False, "num_channels": 1},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_random_config_tp_matches_full(name: str) -> None:
    config = _tiny_config(**VARIANTS[name])
    model = VitClassificationModel(config)
    _randomize(model, seed=len(name))
    state = model.state_dict()
    assert list(expected_shapes(config).items()) == _shape_list(state)
    images = _images(config)
    with torch.no_grad():
        full = model(images)
    assert full.shape == (3, 5)
    legacy = bool(config.get("megatron_legacy"))
    for tp in (1, 2, 4):
        shards = _split(state, tp, legacy=legacy)
        for shard in shards:
            assert list(expected_shapes(config, tp).items()) == _shape_list(shard)
        out = forward_tensor_parallel(config, shards, images)
        torch.testing.assert_close(out, full, atol=ATOL, rtol=0)


def test_legacy_layout_matters() -> None:
    """The same weights read per-head vs block give different logits; a plain (non-strided)
    split of a legacy model's q/k/v breaks the TP forward."""
    config = _tiny_config(megatron_legacy=True)
    model = VitClassificationModel(config)
    _randomize(model, seed=3)
    images = _images(config)
    per_head = VitClassificationModel(_tiny_config())
    per_head.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = model(images)
        assert (per_head(images) - full).abs().max() > 1e-3
    plain = _split(model.state_dict(), 2, legacy=False)
    assert (forward_tensor_parallel(config, plain, images) - full).abs().max() > 1e-3


def test_variant_keys() -> None:
    def keys(**overrides) -> list[str]:
        return list(expected_shapes(_tiny_config(**overrides)))

    b = "model.backbone."
    assert b + "linear_encoder.bias" in keys(patch_embedding="linear_encoder")
    assert b + "conv1.weight" not in keys(patch_embedding="linear_encoder")
    assert b + "position_embeddings" in keys(position_embedding_type="learned_parameters")
    assert keys(finetune=True)[-2:] == ["model.head.weight", "model.head.bias"]
    layer = [k for k in keys(layerscale=True) if ".layers.0." in k]
    assert layer[-2:] == [
        b + "transformer.layers.0.post_attention_layerscale.gamma",
        b + "transformer.layers.0.post_mlp_layerscale.gamma",
    ]
    pre = keys(preprocess_layernorm=True)
    assert pre.index(b + "preprocess_layernorm.bias") < pre.index(
        b + "transformer.layers.0.input_layernorm.weight"
    )
    shapes = expected_shapes(_tiny_config(kv_channels=6), tp=2)
    assert shapes[b + "transformer.layers.0.self_attention.query_key_value.weight"] == (36, 32)
    assert shapes[b + "transformer.layers.0.self_attention.dense.weight"] == (32, 12)


def test_dims_and_activation_resolution() -> None:
    dims = vit_dims(_tiny_config())
    assert (dims.head_dim, dims.projection, dims.class_tokens) == (8, 32, 8)
    assert (dims.grid_h, dims.grid_w, dims.num_patches, dims.seq_len) == (2, 3, 6, 14)
    assert vit_options(_tiny_config()).activation == "gelu"
    assert vit_options(_tiny_config(openai_gelu=True)).activation == "gelu_tanh_openai"
    fused = _tiny_config(bias_activation_fusion=True)
    assert vit_options(fused).activation == "gelu_tanh_fused"
    assert vit_options(_tiny_config(activation="approx-gelu")).activation == "quick_gelu"


@pytest.mark.parametrize(
    ("overrides", "tp", "message"),
    [
        ({"hidden_size": 30}, 1, "hidden_size 30 is not divisible by num_attention_heads 4"),
        ({"img_w": 10}, 1, "img_w 10 is not divisible by patch_dim 4"),
        ({"num_layers": None}, 1, "num_layers: model config lacks this required key"),
        ({"num_layers": 0}, 1, "num_layers: must be a positive integer"),
        ({"activation": "swiglu"}, 1, "activation: unsupported value 'swiglu'"),
        ({"position_embedding_type": "rope"}, 1, "position_embedding_type: unsupported"),
        ({"normalization": "rmsnorm"}, 1, "normalization: unsupported"),
        ({"activation": "approx-gelu", "bias_activation_fusion": True}, 1, "not supported"),
        ({}, 3, "num_attention_heads 4 is not divisible by tensor-parallel size 3"),
        ({"num_attention_heads": 8, "ffn_hidden_size": 60}, 8, "ffn_hidden_size 60"),
        ({}, 0, "tensor-parallel size must be a positive integer"),
    ],
)
def test_inconsistent_configs_raise(overrides: dict, tp: int, message: str) -> None:
    with pytest.raises(CkptError) as info:
        expected_shapes(_tiny_config(**overrides), tp, path="x.nemo")
    assert str(info.value).startswith("x.nemo: ")
    assert message in str(info.value)


def test_model_rejects_wrong_image_size() -> None:
    model = VitClassificationModel(_tiny_config())
    with pytest.raises(CkptError, match="images must be"):
        model(torch.zeros(1, 3, 8, 8))
