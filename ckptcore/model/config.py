"""NeMo ViT model configs without torch: dimensions, options and every state-dict key's shape.

Planning and checking checkpoints needs only this (``expected_shapes``), so the byte-moving
paths of ckptcore never import torch; :mod:`ckptcore.model.vit` builds the network from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ckptcore.errors import CkptError

PREFIX = "model."
BACKBONE = "model.backbone."
HEAD = "model.head."

_POSITION_TYPES = ("learned_absolute", "learned_parameters")
_PATCH_EMBEDDINGS = ("conv1", "linear_encoder")
_ACTIVATIONS = ("gelu", "approx-gelu", "squared-relu")


# --------------------------------------------------------------------------------------------
# Config reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VitDims:
    """Every size of the network, derived from a NeMo ViT model config."""

    hidden: int  # hidden_size (H)
    heads: int  # num_attention_heads (n)
    head_dim: int  # kv_channels, or H / n when kv_channels is null (hn)
    projection: int  # heads * head_dim: width of q, k and v each
    ffn: int  # ffn_hidden_size (F)
    layers: int  # num_layers
    patch: int  # patch_dim (P)
    img_h: int
    img_w: int
    channels: int  # num_channels (C)
    class_tokens: int  # class_token_length (T)
    grid_h: int  # img_h / P
    grid_w: int  # img_w / P
    num_patches: int  # grid_h * grid_w (N)
    seq_len: int  # N + T
    num_classes: int  # K


@dataclass(frozen=True)
class VitOptions:
    """The config switches that change keys or numerics (NeMo's defaults when absent)."""

    finetune: bool  # True: head is one Linear; False: dense_in -> tanh -> dense_out
    position_embedding_type: str  # learned_absolute | learned_parameters
    patch_embedding: str  # conv1 (NeMo >= 2.0) | linear_encoder (NeMo 1.23)
    preprocess_layernorm: bool
    layerscale: bool
    megatron_legacy: bool  # q/k/v rows [3, n, hn] instead of [n, 3, hn]
    activation: str  # resolved MLP activation: see ACTIVATION_FUNCS
    layernorm_epsilon: float
    query_key_layer_scaling: bool


def _fail(path: str | None, problem: str, key: str | None = None) -> CkptError:
    return CkptError(path, problem, key)


def _raw(config: Mapping[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def _int(config: Mapping[str, Any], key: str, path: str | None, default: Any = ...) -> int:
    if default is ... and config.get(key) is None:
        raise _fail(path, "model config lacks this required key", key)
    value = _raw(config, key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _fail(path, f"expected an integer, got {value!r}", key)
    try:
        number = float(value)
    except ValueError:
        raise _fail(path, f"expected an integer, got {value!r}", key) from None
    if not number.is_integer():
        raise _fail(path, f"expected an integer, got {value!r}", key)
    return int(number)


def _positive(config: Mapping[str, Any], key: str, path: str | None, default: Any = ...) -> int:
    value = _int(config, key, path, default)
    if value < 1:
        raise _fail(path, f"must be a positive integer, got {value}", key)
    return value


def _bool(config: Mapping[str, Any], key: str, path: str | None, default: bool) -> bool:
    value = _raw(config, key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _fail(path, f"expected true or false, got {value!r}", key)


def _choice(
    config: Mapping[str, Any], key: str, path: str | None, default: str, choices: tuple[str, ...]
) -> str:
    value = _raw(config, key, default)
    if value not in choices:
        raise _fail(path, f"unsupported value {value!r} (supported: {', '.join(choices)})", key)
    return value


def vit_dims(config: Mapping[str, Any], *, path: str | None = None) -> VitDims:
    """Read and check the sizes of a NeMo ViT config; ``path`` only labels errors.

    Raises ``CkptError`` for a missing size, a non-positive one, a hidden size not divisible by the
    head count (without ``kv_channels``) or an image size not divisible by the patch size.
    """
    hidden = _positive(config, "hidden_size", path)
    heads = _positive(config, "num_attention_heads", path)
    if config.get("kv_channels") is None:
        if hidden % heads:
            raise _fail(
                path,
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads}",
                "hidden_size",
            )
        head_dim = hidden // heads
    else:
        head_dim = _positive(config, "kv_channels", path)
    patch = _positive(config, "patch_dim", path)
    img_h = _positive(config, "img_h", path)
    img_w = _positive(config, "img_w", path)
    for key, size in (("img_h", img_h), ("img_w", img_w)):
        if size % patch:
            raise _fail(path, f"{key} {size} is not divisible by patch_dim {patch}", key)
    class_tokens = _positive(config, "class_token_length", path, 8)
    grid_h, grid_w = img_h // patch, img_w // patch
    return VitDims(
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        projection=heads * head_dim,
        ffn=_positive(config, "ffn_hidden_size", path),
        layers=_positive(config, "num_layers", path),
        patch=patch,
        img_h=img_h,
        img_w=img_w,
        channels=_positive(config, "num_channels", path, 3),
        class_tokens=class_tokens,
        grid_h=grid_h,
        grid_w=grid_w,
        num_patches=grid_h * grid_w,
        seq_len=grid_h * grid_w + class_tokens,
        num_classes=_positive(config, "num_classes", path),
    )


def _resolve_activation(config: Mapping[str, Any], path: str | None) -> str:
    """NeMo's choice of MLP activation function.

    ``openai_gelu`` takes precedence over everything (tanh GELU, ``openai``); with
    ``bias_activation_fusion`` a ``gelu`` MLP runs NeMo's fused bias-GELU (tanh GELU, ``fused``);
    otherwise ``gelu`` is the exact erf GELU, ``approx-gelu`` is x*sigmoid(1.702x).
    """
    activation = _choice(config, "activation", path, "gelu", _ACTIVATIONS)
    if _bool(config, "openai_gelu", path, False):
        return "gelu_tanh_openai"
    if _bool(config, "bias_activation_fusion", path, False):
        if activation != "gelu":
            raise _fail(
                path,
                f"bias_activation_fusion with activation {activation!r} is not supported",
                "bias_activation_fusion",
            )
        return "gelu_tanh_fused"
    return {"gelu": "gelu", "approx-gelu": "quick_gelu", "squared-relu": "squared_relu"}[activation]


def vit_options(config: Mapping[str, Any], *, path: str | None = None) -> VitOptions:
    """Read and check the switches of a NeMo ViT config (NeMo's code defaults when absent)."""
    normalization = _raw(config, "normalization", "layernorm")
    if normalization != "layernorm":
        raise _fail(path, f"unsupported normalization {normalization!r}", "normalization")
    epsilon = _raw(config, "layernorm_epsilon", 1e-5)
    try:
        epsilon = float(epsilon)
    except (TypeError, ValueError):
        raise _fail(path, f"expected a number, got {epsilon!r}", "layernorm_epsilon") from None
    if not epsilon > 0:
        raise _fail(path, f"must be positive, got {epsilon}", "layernorm_epsilon")
    return VitOptions(
        finetune=_bool(config, "finetune", path, False),
        position_embedding_type=_choice(
            config, "position_embedding_type", path, "learned_absolute", _POSITION_TYPES
        ),
        patch_embedding=_choice(config, "patch_embedding", path, "conv1", _PATCH_EMBEDDINGS),
        preprocess_layernorm=_bool(config, "preprocess_layernorm", path, False),
        layerscale=_bool(config, "layerscale", path, False),
        megatron_legacy=_bool(config, "megatron_legacy", path, False),
        activation=_resolve_activation(config, path),
        layernorm_epsilon=epsilon,
        query_key_layer_scaling=_bool(config, "apply_query_key_layer_scaling", path, True),
    )


def with_weights_layout(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``config`` plus the switches NeMo records in no config key, read from the weights' names.

    NeMo 1.23's ``VitBackbone`` always builds the patch embedding as ``linear_encoder`` (a Linear
    over flattened patches, with a bias), NeMo 2.x always as ``conv1`` (a Conv2d without one),
    and neither writes a config key for it. The weights say which: a ``linear_encoder.weight``
    key means NeMo 1.23's layout, a ``conv1.weight`` key NeMo 2.x's. A ``patch_embedding`` key
    in the config (as this project once wrote) gives way to what the weights hold. The result
    is for building and checking the network; the config written out stays as NeMo wrote it.
    """
    out = dict(config)
    names = set(keys)
    if BACKBONE + "linear_encoder.weight" in names:
        out["patch_embedding"] = "linear_encoder"
    elif BACKBONE + "conv1.weight" in names:
        out["patch_embedding"] = "conv1"
    return out


# --------------------------------------------------------------------------------------------
# Expected shapes
# --------------------------------------------------------------------------------------------


def _check_tp(dims: VitDims, tp: int, path: str | None) -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise _fail(path, f"tensor-parallel size must be a positive integer, got {tp!r}")
    if dims.heads % tp:
        raise _fail(
            path,
            f"num_attention_heads {dims.heads} is not divisible by tensor-parallel size {tp}",
            "num_attention_heads",
        )
    if dims.ffn % tp:
        raise _fail(
            path,
            f"ffn_hidden_size {dims.ffn} is not divisible by tensor-parallel size {tp}",
            "ffn_hidden_size",
        )


def _layer_shapes(dims: VitDims, opts: VitOptions, tp: int) -> dict[str, tuple[int, ...] | None]:
    h, proj, ffn = dims.hidden, dims.projection // tp, dims.ffn // tp
    shapes: dict[str, tuple[int, ...] | None] = {
        "input_layernorm.weight": (h,),
        "input_layernorm.bias": (h,),
        "self_attention.query_key_value.weight": (3 * proj, h),
        "self_attention.query_key_value.bias": (3 * proj,),
        "self_attention.query_key_value._extra_state": None,
        "self_attention.dense.weight": (h, proj),
        "self_attention.dense.bias": (h,),
        "self_attention.dense._extra_state": None,
        "post_attention_layernorm.weight": (h,),
        "post_attention_layernorm.bias": (h,),
        "mlp.dense_h_to_4h.weight": (ffn, h),
        "mlp.dense_h_to_4h.bias": (ffn,),
        "mlp.dense_h_to_4h._extra_state": None,
        "mlp.dense_4h_to_h.weight": (h, ffn),
        "mlp.dense_4h_to_h.bias": (h,),
        "mlp.dense_4h_to_h._extra_state": None,
    }
    if opts.layerscale:
        shapes["post_attention_layerscale.gamma"] = (h,)
        shapes["post_mlp_layerscale.gamma"] = (h,)
    return shapes


def expected_shapes(
    config: Mapping[str, Any], tp: int = 1, *, path: str | None = None
) -> dict[str, tuple[int, ...] | None]:
    """Every state-dict key of one TP rank's ``model_weights.ckpt``, in saved order, with its shape.

    ``_extra_state`` entries map to None. Layers are numbered 0..num_layers-1 (PP=1). At ``tp`` > 1,
    ``query_key_value`` and ``dense_h_to_4h`` (weight and bias) have dim 0 divided by ``tp``,
    ``self_attention.dense.weight`` and ``dense_4h_to_h.weight`` dim 1; everything else is whole.
    Raises ``CkptError`` for an inconsistent config or a ``tp`` that does not divide heads/ffn.
    """
    dims = vit_dims(config, path=path)
    opts = vit_options(config, path=path)
    _check_tp(dims, tp, path)
    h, p, c = dims.hidden, dims.patch, dims.channels
    shapes: dict[str, tuple[int, ...] | None] = {BACKBONE + "cls_token": (1, dims.class_tokens, h)}
    # A bare Parameter of the backbone is saved with cls_token, before every submodule.
    if opts.position_embedding_type == "learned_parameters":
        shapes[BACKBONE + "position_embeddings"] = (dims.seq_len, h)
    if opts.patch_embedding == "conv1":
        shapes[BACKBONE + "conv1.weight"] = (h, c, p, p)
    else:
        shapes[BACKBONE + "linear_encoder.weight"] = (h, p * p * c)
        shapes[BACKBONE + "linear_encoder.bias"] = (h,)
    if opts.position_embedding_type == "learned_absolute":
        shapes[BACKBONE + "position_embeddings.weight"] = (dims.seq_len, h)
    if opts.preprocess_layernorm:
        shapes[BACKBONE + "preprocess_layernorm.weight"] = (h,)
        shapes[BACKBONE + "preprocess_layernorm.bias"] = (h,)
    layer = _layer_shapes(dims, opts, tp)
    for i in range(dims.layers):
        prefix = f"{BACKBONE}transformer.layers.{i}."
        shapes.update({prefix + name: shape for name, shape in layer.items()})
    shapes[BACKBONE + "transformer.final_layernorm.weight"] = (h,)
    shapes[BACKBONE + "transformer.final_layernorm.bias"] = (h,)
    if opts.finetune:
        shapes[HEAD + "weight"] = (dims.num_classes, h)
        shapes[HEAD + "bias"] = (dims.num_classes,)
    else:
        shapes[HEAD + "dense_in.weight"] = (h, h)
        shapes[HEAD + "dense_in.bias"] = (h,)
        shapes[HEAD + "dense_out.weight"] = (dims.num_classes, h)
        shapes[HEAD + "dense_out.bias"] = (dims.num_classes,)
    return shapes
