"""timm ``VisionTransformer`` checkpoints as timm publishes them on the Hub.

The folder holds ``config.json`` (``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg``, ...) beside ``model.safetensors`` or ``pytorch_model.bin`` (see ``hf.py``).
Only the architecture's *overrides* are in ``model_args``; its defaults live in timm's registry,
so only the plain names ``(vit|deit)_<size>_patch<P>_<img>`` are accepted, whose defaults are the
``VisionTransformer`` ones (LayerNorm eps 1e-6, exact GELU, one class token, token pooling).

Keys and the mapping roles they make (``B = blocks.{i}.``)::

    cls_token                       [1, 1, H]                  cls_token
    pos_embed                       [1, 1+N, H] ([1, N, H]     pos_embed (no_embed_class: a zero
                                    with no_embed_class)       class-token row is prepended)
    patch_embed.proj.{weight,bias}  [H, C, P, P], [H]          patch_weight, patch_bias
    B norm1.{weight,bias}           [H]                        ln1_w, ln1_b
    B attn.qkv.{weight,bias}        [3H, H], [3H] rows q; k; v qkv_w, qkv_b (bias absent with
                                                               qkv_bias False)
    B attn.proj.{weight,bias}       [H, H], [H]                proj_w, proj_b
    B norm2.{weight,bias}           [H]                        ln2_w, ln2_b
    B mlp.fc1.{weight,bias}         [F, H], [F]                fc1_w, fc1_b
    B mlp.fc2.{weight,bias}         [H, F], [H]                fc2_w, fc2_b
    norm.{weight,bias}              [H]                        norm_w, norm_b
    head.{weight,bias}              [K, H], [K]                head_w, head_b

Refused, with the reason: register tokens, distillation tokens/heads, ``fc_norm`` / average or
attention pooling, no class token, ``norm_pre``, layer scale (``ls1``/``ls2``), ``qk_norm``,
extra norms in attention/MLP, custom blocks/MLPs, activations NeMo cannot run, non-square images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ckptcore.community.mapping import Arch, Geometry, KeyScheme
from ckptcore.errors import CkptError

_B = "blocks.{i}."

TIMM_SCHEME = KeyScheme(
    name="timm",
    keys={
        "cls_token": ("cls_token",),
        "pos_embed": ("pos_embed",),
        "patch_weight": ("patch_embed.proj.weight",),
        "patch_bias": ("patch_embed.proj.bias",),
        "ln1_w": (_B + "norm1.weight",),
        "ln1_b": (_B + "norm1.bias",),
        "qkv_w": (_B + "attn.qkv.weight",),
        "qkv_b": (_B + "attn.qkv.bias",),
        "proj_w": (_B + "attn.proj.weight",),
        "proj_b": (_B + "attn.proj.bias",),
        "ln2_w": (_B + "norm2.weight",),
        "ln2_b": (_B + "norm2.bias",),
        "fc1_w": (_B + "mlp.fc1.weight",),
        "fc1_b": (_B + "mlp.fc1.bias",),
        "fc2_w": (_B + "mlp.fc2.weight",),
        "fc2_b": (_B + "mlp.fc2.bias",),
        "norm_w": ("norm.weight",),
        "norm_b": ("norm.bias",),
        "head_w": ("head.weight",),
        "head_b": ("head.bias",),
    },
)

# size word -> (embed_dim, num_heads, depth, mlp_ratio): timm's registered defaults
SIZES: dict[str, tuple[int, int, int, float]] = {
    "tiny": (192, 3, 12, 4.0),
    "small": (384, 6, 12, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 16, 24, 4.0),
    "huge": (1280, 16, 32, 4.0),
    "giant": (1408, 16, 40, 48 / 11),
    "gigantic": (1664, 16, 48, 64 / 13),
}
_PLAIN = re.compile(r"^(vit|deit)_(" + "|".join(SIZES) + r")_patch(\d+)_(\d+)$")

LAYERNORM_EPS = 1e-6  # timm VisionTransformer's default norm_layer
# act_layer -> canonical activation
TIMM_ACTIVATIONS = {
    None: "gelu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}

# model_args this importer reads or that do not change inference
_FREE_ARGS = {
    "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "no_embed_class", "act_layer", "dynamic_img_size", "dynamic_img_pad",
    "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
    "drop_path_rate", "weight_init", "fix_init", "device", "dtype",
}  # fmt: skip
# model_args that must keep the VisionTransformer default: (allowed values, why otherwise refused)
_FIXED_ARGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "global_pool": (("token",), "global pooling other than the class token"),
    "class_token": ((True,), "no class token"),
    "reg_tokens": ((0, None), "register tokens"),
    "pos_embed": (("learn",), "a position embedding other than a learned table"),
    "pre_norm": ((False, None), "a pre-norm (norm_pre, CLIP style)"),
    "final_norm": ((True,), "no final norm"),
    "fc_norm": ((None, False), "fc_norm (a norm after pooling)"),
    "pool_include_prefix": ((False, None), "pooling over prefix tokens"),
    "qk_norm": ((False, None), "qk_norm"),
    "scale_attn_norm": ((False, None), "a norm inside attention"),
    "scale_mlp_norm": ((False, None), "a norm inside the MLP"),
    "proj_bias": ((True, None), "projections without bias"),
    "init_values": ((None,), "layer scale (init_values)"),
}
# weight keys that reveal a structure NeMo's ViT cannot express
_UNSUPPORTED_KEYS: tuple[tuple[str, str], ...] = (
    (r"^reg_token$", "register tokens (reg_token)"),
    (r"^dist_token$|^head_dist\.", "a distillation token and head (distilled DeiT)"),
    (r"^fc_norm\.", "fc_norm (average pooling head norm)"),
    (r"^attn_pool\.", "attention pooling (global_pool 'map')"),
    (r"^norm_pre\.", "a pre-norm (norm_pre, CLIP style)"),
    (r"\.ls[12]\.gamma$", "layer scale (ls1/ls2)"),
    (r"\.attn\.[qk]_norm\.", "qk_norm"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "a norm inside attention or the MLP"),
)


def is_timm_config(config: Mapping[str, Any]) -> bool:
    """True for a timm Hub ``config.json`` (``architecture`` plus timm's own fields)."""
    return isinstance(config.get("architecture"), str) and any(
        k in config for k in ("pretrained_cfg", "model_args", "num_classes", "num_features")
    )


def _int(value: Any, key: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CkptError(path, f"expected a positive integer, got {value!r}", key)
    return value


def _square(value: Any, key: str, path: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise CkptError(path, f"non-square {key} {list(value)} is not supported", key)
        value = value[0]
    return _int(value, key, path)


def check_weight_keys(keys: Iterable[str], weights: str) -> None:
    """Refuse structures NeMo cannot express, named from the weight keys (``weights`` labels)."""
    keys = list(keys)
    for rx, why in _UNSUPPORTED_KEYS:
        hit = next((k for k in keys if re.search(rx, k)), None)
        if hit is not None:
            raise CkptError(weights, f"unsupported timm ViT: {why}", hit)
    if "cls_token" not in keys:
        raise CkptError(weights, "unsupported timm ViT: no class token (cls_token)")
    if "head.weight" not in keys:
        raise CkptError(weights, "unsupported timm ViT: no classification head (num_classes 0)")


def timm_arch(config: Mapping[str, Any], path: str) -> tuple[Arch, KeyScheme]:
    """Read a timm Hub ``config.json`` (``path`` labels errors): the model and its key scheme."""
    name = config.get("architecture")
    m = _PLAIN.match(name) if isinstance(name, str) else None
    if m is None:
        raise CkptError(
            path,
            f"architecture {name!r} is not supported: only the plain timm ViTs "
            "(vit|deit)_<tiny|small|base|large|huge|giant|gigantic>_patch<P>_<img> convert; "
            "other variants' defaults (norms, tokens, pooling, activation) are not in config.json",
            "architecture",
        )
    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise CkptError(path, "expected an object", "model_args")
    for key, value in args.items():
        if key in _FIXED_ARGS:
            allowed, why = _FIXED_ARGS[key]
            if value not in allowed:
                raise CkptError(
                    path, f"unsupported timm ViT: {why} ({key}={value!r})", f"model_args.{key}"
                )
        elif key not in _FREE_ARGS:
            raise CkptError(
                path, f"unsupported timm ViT: model argument {key}={value!r}", f"model_args.{key}"
            )
    pool = config.get("global_pool", "token")
    if pool != "token":
        raise CkptError(
            path, f"unsupported timm ViT: global_pool {pool!r} (only 'token')", "global_pool"
        )
    act = args.get("act_layer")
    if act not in TIMM_ACTIVATIONS:
        raise CkptError(path, f"unsupported timm ViT: act_layer {act!r}", "model_args.act_layer")
    embed, heads, depth, ratio = SIZES[m.group(2)]
    hidden = _int(args.get("embed_dim", embed), "embed_dim", path)
    if "num_heads" in args:
        heads = _int(args["num_heads"], "num_heads", path)
    elif hidden != embed:
        raise CkptError(
            path,
            f"embed_dim {hidden} differs from {name}'s {embed} but model_args has no num_heads",
            "model_args.num_heads",
        )
    if hidden % heads:
        raise CkptError(path, f"embed_dim {hidden} is not divisible by num_heads {heads}")
    mlp_ratio = args.get("mlp_ratio", ratio)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, int | float) or mlp_ratio <= 0:
        raise CkptError(path, f"expected a positive number, got {mlp_ratio!r}", "mlp_ratio")
    patch = _square(args.get("patch_size", int(m.group(3))), "patch_size", path)
    image = _square(args.get("img_size", int(m.group(4))), "img_size", path)
    if image % patch:
        raise CkptError(path, f"img_size {image} is not divisible by patch_size {patch}")
    pretrained = config.get("pretrained_cfg") or {}
    classes = config.get("num_classes", args.get("num_classes", pretrained.get("num_classes")))
    if classes in (None, 0):
        raise CkptError(
            path, "unsupported timm ViT: no classification head (num_classes 0)", "num_classes"
        )
    g = Geometry(
        hidden=hidden,
        heads=heads,
        head_dim=hidden // heads,
        ffn=int(hidden * mlp_ratio),
        layers=_int(args.get("depth", depth), "depth", path),
        patch=patch,
        image=image,
        channels=_int(args.get("in_chans", 3), "in_chans", path),
        classes=_int(classes, "num_classes", path),
    )
    scheme = TIMM_SCHEME
    absent = frozenset() if args.get("qkv_bias", True) else frozenset({"qkv_b"})
    if absent or args.get("no_embed_class"):
        scheme = KeyScheme(
            TIMM_SCHEME.name,
            TIMM_SCHEME.keys,
            absent=absent,
            shapes={"pos_embed": ("1", "N", "H")} if args.get("no_embed_class") else {},
            adapt={"pos_embed": "prepend_class_position"} if args.get("no_embed_class") else {},
        )
    return Arch(g, LAYERNORM_EPS, TIMM_ACTIVATIONS[act]), scheme


__all__ = ["TIMM_SCHEME", "check_weight_keys", "is_timm_config", "timm_arch"]
