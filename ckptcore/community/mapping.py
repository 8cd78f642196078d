"""The community-ViT <-> NeMo ViT mapping as data: one table, named pure transforms, both ways.

A community checkpoint (transformers ``ViTForImageClassification`` or a timm ``VisionTransformer``)
is described by format-neutral *roles*. Each format module (``hf.py``, ``timm.py``) says which of
its keys make each role (several keys are concatenated along dim 0, e.g. HF's query, key and value
make ``qkv_w``). Role shapes, with H hidden, D = heads*head_dim, F ffn, C channels, P patch,
N patches, K classes (one class token)::

    cls_token     [1, 1, H]          pos_embed  [1, 1+N, H] (row 0: the class token)
    patch_weight  [H, C, P, P]       patch_bias [H]
    ln1_w ln1_b   [H]                qkv_w [3D, H], qkv_b [3D]: rows [3, heads, head_dim] (q; k; v)
    proj_w        [H, D]             proj_b [H]
    ln2_w ln2_b   [H]                fc1_w [F, H], fc1_b [F]   fc2_w [H, F], fc2_b [H]
    norm_w norm_b [H]                head_w [K, H], head_b [K]

:data:`ROWS` maps NeMo keys (``expected_shapes(config)``, see ``ckptcore.model.vit``) to roles
through a named transform of :data:`TRANSFORMS`. Import runs ``forward`` (roles -> NeMo tensor);
export runs ``inverse`` (NeMo tensor -> roles) over the same rows. Every transform is an exact
inverse pair except ``fold_patch_bias`` (conv1 layout): NeMo >= 2.0 has no patch-embedding bias,
so the bias is added to the patch rows of the position table; its inverse returns that table as
the position embedding and a zero patch bias (same logits, different tensors: the one documented
exception of the round trip).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ckptcore.errors import CkptError
from ckptcore.model.vit import BACKBONE, HEAD

LAYOUTS = ("conv1", "linear_encoder")

# --------------------------------------------------------------------------------------------
# Roles: format-neutral tensors and their shapes (symbols resolved by Geometry.size)
# --------------------------------------------------------------------------------------------

GLOBAL_ROLES: dict[str, tuple[str, ...]] = {
    "cls_token": ("1", "1", "H"),
    "pos_embed": ("1", "S", "H"),
    "patch_weight": ("H", "C", "P", "P"),
    "patch_bias": ("H",),
    "norm_w": ("H",),
    "norm_b": ("H",),
    "head_w": ("K", "H"),
    "head_b": ("K",),
}
LAYER_ROLES: dict[str, tuple[str, ...]] = {
    "ln1_w": ("H",),
    "ln1_b": ("H",),
    "qkv_w": ("3D", "H"),
    "qkv_b": ("3D",),
    "proj_w": ("H", "D"),
    "proj_b": ("H",),
    "ln2_w": ("H",),
    "ln2_b": ("H",),
    "fc1_w": ("F", "H"),
    "fc1_b": ("F",),
    "fc2_w": ("H", "F"),
    "fc2_b": ("H",),
}


@dataclass(frozen=True)
class Geometry:
    """The sizes the transforms and role shapes need."""

    hidden: int
    heads: int
    head_dim: int
    ffn: int
    layers: int
    patch: int
    image: int
    channels: int
    classes: int

    @property
    def num_patches(self) -> int:
        return (self.image // self.patch) ** 2

    def size(self, symbol: str) -> int:
        d = self.heads * self.head_dim
        table = {
            "1": 1,
            "H": self.hidden,
            "S": self.num_patches + 1,
            "N": self.num_patches,
            "C": self.channels,
            "P": self.patch,
            "D": d,
            "3D": 3 * d,
            "F": self.ffn,
            "K": self.classes,
        }
        return table[symbol]

    def role_shape(self, role: str) -> tuple[int, ...]:
        symbols = GLOBAL_ROLES.get(role) or LAYER_ROLES[role]
        return tuple(self.size(s) for s in symbols)


# --------------------------------------------------------------------------------------------
# Transforms: pure functions, forward (roles -> NeMo) and inverse (NeMo -> roles)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    name: str
    forward: Callable[[list[Tensor], Geometry], Tensor]
    inverse: Callable[[Tensor, Geometry], list[Tensor]]
    exact: bool = True  # inverse(forward(x)) == x
    doc: str = ""


def _identity(xs: list[Tensor], g: Geometry) -> Tensor:
    return xs[0]


def _identity_inv(t: Tensor, g: Geometry) -> list[Tensor]:
    return [t]


def _qkv_interleave(xs: list[Tensor], g: Geometry) -> Tensor:
    x = xs[0]
    rest = x.shape[1:]
    return x.reshape(3, g.heads, g.head_dim, *rest).transpose(0, 1).reshape(x.shape).contiguous()


def _qkv_deinterleave(t: Tensor, g: Geometry) -> list[Tensor]:
    rest = t.shape[1:]
    return [t.reshape(g.heads, 3, g.head_dim, *rest).transpose(0, 1).reshape(t.shape).contiguous()]


def _conv_to_linear(xs: list[Tensor], g: Geometry) -> Tensor:
    w = xs[0]
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()


def _linear_to_conv(t: Tensor, g: Geometry) -> list[Tensor]:
    w = t.reshape(t.shape[0], g.patch, g.patch, g.channels)
    return [w.permute(0, 3, 1, 2).contiguous()]


def _drop_batch_dim(xs: list[Tensor], g: Geometry) -> Tensor:
    return xs[0][0].contiguous()


def _add_batch_dim(t: Tensor, g: Geometry) -> list[Tensor]:
    return [t.unsqueeze(0).contiguous()]


def _fold_patch_bias(xs: list[Tensor], g: Geometry) -> Tensor:
    pos, bias = xs
    table = pos[0].clone()
    table[1:] += bias.to(table.dtype)
    return table


def _unfold_patch_bias(t: Tensor, g: Geometry) -> list[Tensor]:
    return [t.unsqueeze(0).contiguous(), torch.zeros(t.shape[1], dtype=t.dtype)]


def _prepend_class_position(xs: list[Tensor], g: Geometry) -> Tensor:
    pos = xs[0]
    zero = torch.zeros(pos.shape[0], 1, pos.shape[2], dtype=pos.dtype)
    return torch.cat((zero, pos), dim=1)


def _drop_class_position(t: Tensor, g: Geometry) -> list[Tensor]:
    return [t[:, 1:].contiguous()]


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("identity", _identity, _identity_inv, doc="as is"),
        Transform(
            "qkv_interleave",
            _qkv_interleave,
            _qkv_deinterleave,
            doc="rows [3, heads, hn] (q; k; v) -> [heads, 3, hn] (per head q, k, v)",
        ),
        Transform(
            "conv_to_linear",
            _conv_to_linear,
            _linear_to_conv,
            doc="conv kernel [H, C, P, P] -> linear [H, P*P*C], columns (p1 p2 c)",
        ),
        Transform("drop_batch_dim", _drop_batch_dim, _add_batch_dim, doc="[1, S, H] -> [S, H]"),
        Transform(
            "fold_patch_bias",
            _fold_patch_bias,
            _unfold_patch_bias,
            exact=False,
            doc="position [1, 1+N, H] + patch bias [H] on rows 1.. -> [1+N, H]; "
            "inverse keeps the fold and returns a zero bias",
        ),
        Transform(
            "prepend_class_position",
            _prepend_class_position,
            _drop_class_position,
            exact=False,
            doc="patch-only position table [1, N, H] (timm no_embed_class) -> [1, 1+N, H], "
            "a zero row for the class token",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

T = BACKBONE + "transformer.layers.{i}."


@dataclass(frozen=True)
class Row:
    """NeMo key template ``nemo`` (``{i}``: layer) made from ``roles`` by ``transform``.

    ``layout`` / ``legacy`` restrict the row to one patch-embedding layout or one
    ``megatron_legacy`` value (None: always).
    """

    nemo: str
    roles: tuple[str, ...]
    transform: str = "identity"
    layout: str | None = None
    legacy: bool | None = None

    def applies(self, layout: str, legacy: bool) -> bool:
        return (self.layout in (None, layout)) and (self.legacy in (None, legacy))


ROWS: tuple[Row, ...] = (
    Row(BACKBONE + "cls_token", ("cls_token",)),
    Row(BACKBONE + "conv1.weight", ("patch_weight",), layout="conv1"),
    Row(BACKBONE + "linear_encoder.weight", ("patch_weight",), "conv_to_linear", "linear_encoder"),
    Row(BACKBONE + "linear_encoder.bias", ("patch_bias",), layout="linear_encoder"),
    Row(
        BACKBONE + "position_embeddings.weight",
        ("pos_embed", "patch_bias"),
        "fold_patch_bias",
        "conv1",
    ),
    Row(
        BACKBONE + "position_embeddings.weight", ("pos_embed",), "drop_batch_dim", "linear_encoder"
    ),
    Row(T + "input_layernorm.weight", ("ln1_w",)),
    Row(T + "input_layernorm.bias", ("ln1_b",)),
    Row(T + "self_attention.query_key_value.weight", ("qkv_w",), "qkv_interleave", legacy=False),
    Row(T + "self_attention.query_key_value.bias", ("qkv_b",), "qkv_interleave", legacy=False),
    Row(T + "self_attention.query_key_value.weight", ("qkv_w",), legacy=True),
    Row(T + "self_attention.query_key_value.bias", ("qkv_b",), legacy=True),
    Row(T + "self_attention.dense.weight", ("proj_w",)),
    Row(T + "self_attention.dense.bias", ("proj_b",)),
    Row(T + "post_attention_layernorm.weight", ("ln2_w",)),
    Row(T + "post_attention_layernorm.bias", ("ln2_b",)),
    Row(T + "mlp.dense_h_to_4h.weight", ("fc1_w",)),
    Row(T + "mlp.dense_h_to_4h.bias", ("fc1_b",)),
    Row(T + "mlp.dense_4h_to_h.weight", ("fc2_w",)),
    Row(T + "mlp.dense_4h_to_h.bias", ("fc2_b",)),
    Row(BACKBONE + "transformer.final_layernorm.weight", ("norm_w",)),
    Row(BACKBONE + "transformer.final_layernorm.bias", ("norm_b",)),
    Row(HEAD + "weight", ("head_w",)),
    Row(HEAD + "bias", ("head_b",)),
)


def role_key(role: str, layer: int | None) -> str:
    """A concrete role name: ``qkv_w@3`` for layer 3, the role itself for a global one."""
    return role if layer is None else f"{role}@{layer}"


@dataclass(frozen=True)
class Bound:
    """One table row bound to a layer: a concrete NeMo key and its concrete role names."""

    row: Row
    layer: int | None
    nemo_key: str
    role_keys: tuple[str, ...] = field(default=())

    @property
    def transform(self) -> Transform:
        return TRANSFORMS[self.row.transform]


def bind_rows(layers: int, layout: str, legacy: bool = False) -> dict[str, Bound]:
    """{NeMo key: Bound} for a model of ``layers`` layers, in NeMo's state-dict order."""
    if layout not in LAYOUTS:
        raise CkptError(None, f"unknown layout {layout!r} (choose one of: {', '.join(LAYOUTS)})")
    rows = [r for r in ROWS if r.applies(layout, legacy)]
    first = next(i for i, r in enumerate(rows) if "{i}" in r.nemo)
    pre = [(r, None) for r in rows[:first] if "{i}" not in r.nemo]
    per_layer = [(r, i) for i in range(layers) for r in rows if "{i}" in r.nemo]
    post = [(r, None) for r in rows[first:] if "{i}" not in r.nemo]
    out: dict[str, Bound] = {}
    for row, layer in pre + per_layer + post:
        key = row.nemo if layer is None else row.nemo.replace("{i}", str(layer))
        if key in out:
            raise CkptError(None, "mapping table has two rows for this key", key)
        roles = tuple(role_key(r, layer if r in LAYER_ROLES else None) for r in row.roles)
        out[key] = Bound(row, layer, key, roles)
    return out


def role_shape(role_name: str, g: Geometry) -> tuple[int, ...]:
    return g.role_shape(role_name.split("@", 1)[0])


def all_roles(layers: int) -> list[str]:
    """Every concrete role name of a model, globals first then per layer."""
    out = list(GLOBAL_ROLES)
    for i in range(layers):
        out.extend(role_key(r, i) for r in LAYER_ROLES)
    return out


def to_nemo(bound: Bound, read_role: Callable[[str], Tensor], g: Geometry) -> Tensor:
    """The NeMo tensor of one bound row, reading its roles with ``read_role``."""
    return bound.transform.forward([read_role(r) for r in bound.role_keys], g)


def from_nemo(
    state: Mapping[str, Tensor | None], g: Geometry, layout: str, legacy: bool
) -> dict[str, Tensor]:
    """Every role tensor of a merged (TP=1, PP=1) NeMo state dict, via the inverse transforms.

    Raises ``CkptError`` if a table key is missing or a role would be produced twice or never.
    """
    bound = bind_rows(g.layers, layout, legacy)
    roles: dict[str, Tensor] = {}
    for key, b in bound.items():
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise CkptError(None, "the .nemo lacks this tensor", key)
        outs = b.transform.inverse(value, g)
        for name, tensor in zip(b.role_keys, outs, strict=True):
            if name in roles:
                raise CkptError(None, f"mapping table produces role {name} twice", key)
            roles[name] = tensor
    missing = [r for r in all_roles(g.layers) if r not in roles]
    if missing:
        raise CkptError(None, f"mapping table produces no tensor for roles {missing[:4]}")
    return roles


# --------------------------------------------------------------------------------------------
# Format key schemes: which source keys make each role
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyScheme:
    """How one community format names the roles.

    ``keys[role]`` lists key templates (``{i}``: layer); several are concatenated on dim 0 to make
    the role (and the role is split evenly into them on export). ``absent`` roles are not in the
    source (e.g. ``qkv_bias: False``) and read as zeros. ``ignored`` are regexes of source keys
    that are not part of the classifier (dropped with a note). ``shapes`` overrides a role's
    source shape (symbols as in :data:`GLOBAL_ROLES`) and ``adapt`` names the transform that
    turns that source form into the role form.
    """

    name: str
    keys: Mapping[str, tuple[str, ...]]
    absent: frozenset[str] = frozenset()
    ignored: tuple[str, ...] = ()
    shapes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    adapt: Mapping[str, str] = field(default_factory=dict)

    def keys_for(self, role_name: str) -> tuple[str, ...]:
        role, _, layer = role_name.partition("@")
        return tuple(t.replace("{i}", layer) for t in self.keys[role])

    def part_shapes(self, role_name: str, g: Geometry) -> list[tuple[int, ...]]:
        role = role_name.split("@", 1)[0]
        symbols = self.shapes.get(role) or GLOBAL_ROLES.get(role) or LAYER_ROLES[role]
        full = tuple(g.size(s) for s in symbols)
        n = len(self.keys[role])
        return [(full[0] // n, *full[1:])] * n


class RoleReader:
    """Role tensors read from a source's weights by a :class:`KeyScheme`.

    ``specs`` gives every source key's dtype and shape (nothing read yet), ``fetch(key)`` reads one
    tensor, ``file_of(key)`` names the file holding it (for errors). :meth:`check` compares every
    source shape with the one the config implies and rejects missing and unexpected tensors.
    """

    def __init__(
        self,
        scheme: KeyScheme,
        geometry: Geometry,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        fetch: Callable[[str], Tensor],
        file_of: Callable[[str | None], str],
    ) -> None:
        self.scheme = scheme
        self.g = geometry
        self.specs = specs
        self.fetch = fetch
        self.file_of = file_of
        floats = [d for d, _ in specs.values() if d.is_floating_point]
        self.default_dtype = floats[0] if floats else torch.float32
        self.notes: list[str] = []

    def _is_absent(self, role_name: str) -> bool:
        return role_name.split("@", 1)[0] in self.scheme.absent

    def check(self) -> None:
        used: set[str] = set()
        for role_name in all_roles(self.g.layers):
            keys = self.scheme.keys_for(role_name)
            shapes = self.scheme.part_shapes(role_name, self.g)
            if self._is_absent(role_name):
                present = [k for k in keys if k in self.specs]
                if present:
                    raise CkptError(
                        self.file_of(present[0]),
                        "config.json says this tensor does not exist (config and weights disagree)",
                        present[0],
                    )
                continue
            for key, want in zip(keys, shapes, strict=True):
                if key not in self.specs:
                    raise CkptError(
                        self.file_of(None),
                        f"missing tensor of shape {list(want)} implied by config.json "
                        "(config and weights disagree)",
                        key,
                    )
                got = tuple(self.specs[key][1])
                if got != tuple(want):
                    raise CkptError(
                        self.file_of(key),
                        f"shape {list(got)} does not match {list(want)} implied by config.json "
                        "(config and weights disagree)",
                        key,
                    )
                used.add(key)
        ignored = [re.compile(rx) for rx in self.scheme.ignored]
        extra = []
        for key in self.specs:
            if key in used:
                continue
            if any(rx.search(key) for rx in ignored):
                self.notes.append(f"ignored {key}: not used by the classifier")
                continue
            extra.append(key)
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise CkptError(
                self.file_of(extra[0]),
                f"unexpected tensors for a plain {self.scheme.name} ViT classifier of this "
                f"config: {', '.join(extra[:5])}{more}",
            )

    def dtype(self, role_name: str) -> torch.dtype:
        if self._is_absent(role_name):
            return self.default_dtype
        return self.specs[self.scheme.keys_for(role_name)[0]][0]

    def read(self, role_name: str) -> Tensor:
        role = role_name.split("@", 1)[0]
        if self._is_absent(role_name):
            return torch.zeros(role_shape(role_name, self.g), dtype=self.default_dtype)
        parts = [self.fetch(k) for k in self.scheme.keys_for(role_name)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if role in self.scheme.adapt:
            t = TRANSFORMS[self.scheme.adapt[role]].forward([t], self.g)
        return t


def split_role(scheme: KeyScheme, role_name: str, tensor: Tensor) -> dict[str, Tensor]:
    """{source key: tensor} of one role for export (parts are independent contiguous copies)."""
    role = role_name.split("@", 1)[0]
    if role in scheme.adapt:
        raise CkptError(None, f"{scheme.name} export of adapted role {role} is not supported")
    keys = scheme.keys_for(role_name)
    parts = tensor.chunk(len(keys), dim=0) if len(keys) > 1 else (tensor,)
    return {k: p.contiguous().clone() for k, p in zip(keys, parts, strict=True)}


# --------------------------------------------------------------------------------------------
# Config mapping (nemo-formats.md section 6.1)
# --------------------------------------------------------------------------------------------

# canonical activation -> the NeMo config keys that select it
ACTIVATIONS: dict[str, dict[str, Any]] = {
    "gelu": {"activation": "gelu", "openai_gelu": False, "bias_activation_fusion": False},
    "gelu_tanh": {"activation": "gelu", "openai_gelu": True, "bias_activation_fusion": False},
    "quick_gelu": {
        "activation": "approx-gelu",
        "openai_gelu": False,
        "bias_activation_fusion": False,
    },
    "squared_relu": {
        "activation": "squared-relu",
        "openai_gelu": False,
        "bias_activation_fusion": False,
    },
}
# ckptcore.model.vit's resolved activation -> canonical
FROM_NEMO_ACTIVATION = {
    "gelu": "gelu",
    "gelu_tanh_openai": "gelu_tanh",
    "gelu_tanh_fused": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "squared_relu": "squared_relu",
}


@dataclass(frozen=True)
class Arch:
    """A community ViT classifier, format-neutral: sizes, LayerNorm epsilon, MLP activation."""

    geometry: Geometry
    layernorm_epsilon: float
    activation: str  # a key of ACTIVATIONS


def nemo_config(arch: Arch, layout: str, dtype: torch.dtype) -> dict[str, Any]:
    """The NeMo ``model_config.yaml`` of an imported model (TP=1, PP=1).

    ``BASE_CONFIG`` (target, optim, data, ...) plus the sizes, ``class_token_length: 1``,
    ``finetune: True`` (single Linear head), the source's LayerNorm epsilon and activation,
    ``megatron_legacy: False`` (per-head q/k/v rows), the precision of ``dtype``, and
    ``patch_embedding: linear_encoder`` only for that layout.
    """
    from ckptcore.dtypes import CONFIG_PRECISION, dtype_name
    from ckptcore.sample import BASE_CONFIG

    if layout not in LAYOUTS:
        raise CkptError(None, f"unknown layout {layout!r} (choose one of: {', '.join(LAYOUTS)})")
    g = arch.geometry
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg.update(
        hidden_size=g.hidden,
        num_layers=g.layers,
        num_attention_heads=g.heads,
        kv_channels=None if g.heads * g.head_dim == g.hidden else g.head_dim,
        ffn_hidden_size=g.ffn,
        patch_dim=g.patch,
        img_h=g.image,
        img_w=g.image,
        num_channels=g.channels,
        num_classes=g.classes,
        encoder_seq_length=g.num_patches,
        max_position_embeddings=g.num_patches,
        class_token_length=1,
        finetune=True,
        layernorm_epsilon=arch.layernorm_epsilon,
        megatron_legacy=False,
        position_embedding_type="learned_absolute",
        preprocess_layernorm=False,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        precision=CONFIG_PRECISION.get(dtype_name(dtype), 32),
        megatron_amp_O2=dtype != torch.float32,
    )
    cfg.update(ACTIVATIONS[arch.activation])
    if layout == "linear_encoder":
        cfg["patch_embedding"] = "linear_encoder"
        cfg["nemo_version"] = "1.23.0"
    return cfg


@dataclass(frozen=True)
class NemoVariant:
    """What a NeMo ViT config says about how its tensors are laid out."""

    arch: Arch
    layout: str
    legacy: bool
    position_key: str  # the NeMo key of the position table


def nemo_variant(config: Mapping[str, Any], path: str | None) -> NemoVariant:
    """Read a NeMo ViT config for export; ``CkptError`` for what a community ViT cannot express."""
    from ckptcore.model.vit import vit_dims, vit_options

    dims = vit_dims(config, path=path)
    opts = vit_options(config, path=path)
    if dims.class_tokens != 1:
        raise CkptError(
            path,
            f"class_token_length is {dims.class_tokens}; a HuggingFace ViT has exactly one "
            "class token",
            "class_token_length",
        )
    if not opts.finetune:
        raise CkptError(
            path,
            "finetune is false: the pretraining head (dense_in -> tanh -> dense_out) has no "
            "HuggingFace counterpart; only the finetune (single Linear) head converts",
            "finetune",
        )
    if dims.img_h != dims.img_w:
        raise CkptError(
            path, f"non-square images ({dims.img_h}x{dims.img_w}) are not supported", "img_h"
        )
    if opts.preprocess_layernorm:
        raise CkptError(
            path, "preprocess_layernorm has no HuggingFace ViT counterpart", "preprocess_layernorm"
        )
    if opts.layerscale:
        raise CkptError(path, "layerscale has no HuggingFace ViT counterpart", "layerscale")
    g = Geometry(
        hidden=dims.hidden,
        heads=dims.heads,
        head_dim=dims.head_dim,
        ffn=dims.ffn,
        layers=dims.layers,
        patch=dims.patch,
        image=dims.img_h,
        channels=dims.channels,
        classes=dims.num_classes,
    )
    arch = Arch(g, opts.layernorm_epsilon, FROM_NEMO_ACTIVATION[opts.activation])
    position_key = BACKBONE + (
        "position_embeddings.weight"
        if opts.position_embedding_type == "learned_absolute"
        else "position_embeddings"
    )
    return NemoVariant(arch, opts.patch_embedding, opts.megatron_legacy, position_key)


__all__ = [
    "ACTIVATIONS",
    "GLOBAL_ROLES",
    "LAYER_ROLES",
    "LAYOUTS",
    "ROWS",
    "TRANSFORMS",
    "Arch",
    "Bound",
    "Geometry",
    "KeyScheme",
    "NemoVariant",
    "RoleReader",
    "Row",
    "Transform",
    "all_roles",
    "bind_rows",
    "from_nemo",
    "nemo_config",
    "nemo_variant",
    "role_key",
    "role_shape",
    "split_role",
    "to_nemo",
]
