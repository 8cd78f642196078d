"""A pure-torch re-implementation of NeMo's ``MegatronVitClassificationModel`` (eval only).

``VitClassificationModel(config)`` is built from the mapping stored in a ``.nemo``'s
``model_config.yaml``. Its ``state_dict()`` has exactly the keys, order and shapes NeMo saves at
TP=1 (``_extra_state: None`` entries included), so NeMo weights load with ``strict=True``, and its
``forward(images)`` reproduces NeMo's logits.

State-dict layout (``p = "model.backbone."``, ``t = p + "transformer.layers.{i}."``, H hidden,
n heads, hn head dim, proj = n*hn, F ffn, P patch, C channels, T class tokens, N patches, K classes)::

    p cls_token                                 [1, T, H]
    p position_embeddings                       [N+T, H]         (learned_parameters only: a bare
                                                                 Parameter, saved before submodules)
    p conv1.weight                              [H, C, P, P]     (NeMo >= 2.0, no bias)
      or p linear_encoder.{weight,bias}         [H, P*P*C], [H]  (NeMo 1.23, patches as (p1 p2 c))
    p position_embeddings.weight                [N+T, H]         (learned_absolute: nn.Embedding)
    p preprocess_layernorm.{weight,bias}        [H]              (only if preprocess_layernorm)
    t input_layernorm.{weight,bias}             [H]
    t self_attention.query_key_value.weight     [3*proj, H]      rows [n, 3, hn] (legacy: [3, n, hn])
    t self_attention.query_key_value.bias       [3*proj]
    t self_attention.query_key_value._extra_state  None
    t self_attention.dense.{weight,bias}        [H, proj], [H]   input columns ordered [n, hn]
    t self_attention.dense._extra_state         None
    t post_attention_layernorm.{weight,bias}    [H]
    t mlp.dense_h_to_4h.{weight,bias}           [F, H], [F]
    t mlp.dense_h_to_4h._extra_state            None
    t mlp.dense_4h_to_h.{weight,bias}           [H, F], [H]
    t mlp.dense_4h_to_h._extra_state            None
    t post_attention_layerscale.gamma           [H]              (only if layerscale)
    t post_mlp_layerscale.gamma                 [H]              (only if layerscale)
    p transformer.final_layernorm.{weight,bias} [H]
    model.head.dense_in.{weight,bias}           [H, H], [H]      (finetune False: dense_out(tanh(dense_in)))
    model.head.dense_out.{weight,bias}          [K, H], [K]
      or model.head.{weight,bias}               [K, H], [K]      (finetune True: one Linear)

The numerics follow NeMo's legacy Megatron transformer: pre-LN blocks, attention scores
``q.k / (sqrt(hn) * coeff)`` softmaxed in fp32 after multiplying back by ``coeff`` (the layer
number when ``apply_query_key_layer_scaling``), biases of row-parallel linears added after the
matmul, and the head applied to the first class token after ``final_layernorm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ckptcore.errors import CkptError
from ckptcore.model.config import (  # noqa: F401  (re-exported)
    _ACTIVATIONS,
    _PATCH_EMBEDDINGS,
    _POSITION_TYPES,
    BACKBONE,
    HEAD,
    PREFIX,
    VitDims,
    VitOptions,
    _bool,
    _check_tp,
    _choice,
    _fail,
    _int,
    _layer_shapes,
    _positive,
    _raw,
    _resolve_activation,
    expected_shapes,
    vit_dims,
    vit_options,
    with_weights_layout,
)
from ckptcore.nemo_io import load_state_dict, nemo_members, package_nemo
from ckptcore.plan import build_plan
from ckptcore.sources import Checkpoint
from ckptcore.storage import RangeCache

# --------------------------------------------------------------------------------------------
# Functional pieces shared with the tensor-parallel forward
# --------------------------------------------------------------------------------------------


def _openai_gelu(x: Tensor) -> Tensor:
    # NeMo utils.openai_gelu
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _fused_bias_gelu(x: Tensor) -> Tensor:
    # NeMo fused_bias_gelu.bias_gelu (applied to y + bias)
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _squared_relu(x: Tensor) -> Tensor:
    return torch.pow(F.relu(x), 2)


ACTIVATION_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh_openai": _openai_gelu,
    "gelu_tanh_fused": _fused_bias_gelu,
    "quick_gelu": _quick_gelu,
    "squared_relu": _squared_relu,
}


def patches_conv1(images: Tensor, weight: Tensor) -> Tensor:
    """NeMo >= 2.0 patch embedding: Conv2d(C, H, P, stride P, no bias) -> [B, N, H], row-major grid."""
    p = weight.shape[-1]
    out = F.conv2d(images, weight, stride=p)  # [B, H, gh, gw]
    return out.reshape(out.shape[0], out.shape[1], -1).permute(0, 2, 1)


def patches_linear(images: Tensor, weight: Tensor, bias: Tensor, patch: int) -> Tensor:
    """NeMo 1.23 patch embedding: ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``, then Linear -> [B, N, H]."""
    b, c, height, width = images.shape
    gh, gw = height // patch, width // patch
    x = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1)
    return F.linear(x.reshape(b, gh * gw, patch * patch * c), weight, bias)


def split_qkv(
    mixed: Tensor, heads: int, head_dim: int, legacy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Split a ``query_key_value`` output ``[B, S, 3*heads*head_dim]`` into q, k, v ``[B, heads, S, hn]``.

    Non-legacy rows (and so output features) are ordered ``[heads, 3, hn]``: per head its q, k, v.
    ``legacy`` (``megatron_legacy: True``) reads them as ``[3, heads, hn]``: all q, all k, all v.
    ``heads`` is the number of heads this tensor holds (per TP rank: n / TP).
    """
    b, s, width = mixed.shape
    if width != 3 * heads * head_dim:
        raise CkptError(
            None, f"query_key_value output width {width} != 3 * {heads} heads * {head_dim}"
        )
    if legacy:
        q, k, v = mixed.view(b, s, 3, heads, head_dim).unbind(dim=2)
    else:
        q, k, v = mixed.view(b, s, heads, 3, head_dim).unbind(dim=3)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def core_attention(q: Tensor, k: Tensor, v: Tensor, coeff: float = 1.0) -> Tensor:
    """Softmax attention over q, k, v ``[B, heads, S, hn]`` -> context ``[B, S, heads*hn]``.

    As NeMo's CoreAttention: scores = q.k^T / (sqrt(hn) * coeff) in the working dtype, softmax in
    fp32 of ``scores * coeff``, cast back, then probs @ v. Context columns are ordered
    ``[heads, hn]``, the input layout of ``self_attention.dense``.
    """
    b, n, s, hn = q.shape
    q3, k3, v3 = (t.reshape(b * n, s, hn) for t in (q, k, v))
    norm_factor = math.sqrt(hn) * coeff
    scores = torch.baddbmm(
        torch.empty(b * n, s, s, dtype=q.dtype, device=q.device),
        q3,
        k3.transpose(1, 2),
        beta=0.0,
        alpha=1.0 / norm_factor,
    )
    scores = scores.float()
    if coeff != 1.0:
        scores = scores * coeff
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    context = torch.bmm(probs, v3).view(b, n, s, hn)
    return context.permute(0, 2, 1, 3).reshape(b, s, n * hn)


def attention_partial(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    dense_weight: Tensor,
    head_dim: int,
    legacy: bool,
    coeff: float,
) -> Tensor:
    """Self-attention for the heads held in ``qkv_weight`` (all heads, or one TP rank's), without
    the ``dense`` bias: the row-parallel partial sum ``context_r @ dense_weight_r^T``.
    """
    heads = qkv_weight.shape[0] // (3 * head_dim)
    # megatron's ColumnParallelLinear: the matmul, then the bias added (two roundings in bf16)
    q, k, v = split_qkv(F.linear(x, qkv_weight) + qkv_bias, heads, head_dim, legacy)
    return F.linear(core_attention(q, k, v, coeff), dense_weight)


def mlp_partial(
    x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, activation: Callable[[Tensor], Tensor]
) -> Tensor:
    """MLP over the ffn slice held in ``w_in`` (all, or one TP rank's), without the output bias."""
    return F.linear(activation(F.linear(x, w_in) + b_in), w_out)


def check_images(images: Tensor, dims: VitDims) -> None:
    """Raise ``CkptError`` unless ``images`` is ``[B, C, img_h, img_w]`` for this config."""
    expected = (dims.channels, dims.img_h, dims.img_w)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise CkptError(
            None, f"images must be [B, {', '.join(map(str, expected))}], got {list(images.shape)}"
        )


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _init_normal(t: torch.Tensor, std: float) -> None:
    """``nn.init.normal_``, skipped for a model built on the meta device to receive loaded
    weights: there it would only import torch's compiler stack (~1 s, once per process)."""
    if not t.is_meta:
        nn.init.normal_(t, std=std)


class MegatronLinear(nn.Linear):
    """``nn.Linear`` that saves ``<prefix>_extra_state: None`` like megatron-core's Column/Row
    ParallelLinear, and, like them, loads state dicts with or without that entry (any value is
    accepted and ignored)."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: Any) -> None:
        del state  # megatron-core ignores it too (TE checkpoints may carry bytes here)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        state_dict.setdefault(prefix + "_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LayerScale(nn.Module):
    """``x * gamma`` (NeMo vision_transformer.LayerScale, key ``gamma``)."""

    def __init__(self, dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """``query_key_value`` [3*proj, H] (rows per head q,k,v) and ``dense`` [H, proj]."""

    def __init__(
        self, dims: VitDims, opts: VitOptions, layer_number: int, dtype: torch.dtype | None
    ):
        super().__init__()
        self.query_key_value = MegatronLinear(dims.hidden, 3 * dims.projection, dtype=dtype)
        self.dense = MegatronLinear(dims.projection, dims.hidden, dtype=dtype)
        self.head_dim = dims.head_dim
        self.legacy = opts.megatron_legacy
        self.coeff = float(layer_number) if opts.query_key_layer_scaling else 1.0

    def forward(self, x: Tensor) -> Tensor:
        """Attention output without the ``dense`` bias (NeMo's skip_bias_add)."""
        return attention_partial(
            x,
            self.query_key_value.weight,
            self.query_key_value.bias,
            self.dense.weight,
            self.head_dim,
            self.legacy,
            self.coeff,
        )


class Mlp(nn.Module):
    """``dense_h_to_4h`` [F, H] -> activation -> ``dense_4h_to_h`` [H, F]."""

    def __init__(self, dims: VitDims, opts: VitOptions, dtype: torch.dtype | None):
        super().__init__()
        self.dense_h_to_4h = MegatronLinear(dims.hidden, dims.ffn, dtype=dtype)
        self.dense_4h_to_h = MegatronLinear(dims.ffn, dims.hidden, dtype=dtype)
        self.activation = ACTIVATION_FUNCS[opts.activation]

    def forward(self, x: Tensor) -> Tensor:
        """MLP output without the ``dense_4h_to_h`` bias (NeMo's skip_bias_add)."""
        return mlp_partial(
            x,
            self.dense_h_to_4h.weight,
            self.dense_h_to_4h.bias,
            self.dense_4h_to_h.weight,
            self.activation,
        )


class TransformerLayer(nn.Module):
    """Pre-LN block: ``x + ls(attn(LN(x)) + b)``, then ``x + ls(mlp(LN(x)) + b)``."""

    def __init__(
        self, dims: VitDims, opts: VitOptions, layer_number: int, dtype: torch.dtype | None
    ):
        super().__init__()
        eps = opts.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(dims.hidden, eps=eps, dtype=dtype)
        self.self_attention = SelfAttention(dims, opts, layer_number, dtype)
        self.post_attention_layernorm = nn.LayerNorm(dims.hidden, eps=eps, dtype=dtype)
        self.mlp = Mlp(dims, opts, dtype)
        self.layerscale = opts.layerscale
        if opts.layerscale:
            self.post_attention_layerscale = LayerScale(dims.hidden, dtype)
            self.post_mlp_layerscale = LayerScale(dims.hidden, dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = self.self_attention(self.input_layernorm(x)) + self.self_attention.dense.bias
        if self.layerscale:
            out = self.post_attention_layerscale(out)
        x = x + out
        out = self.mlp(self.post_attention_layernorm(x)) + self.mlp.dense_4h_to_h.bias
        if self.layerscale:
            out = self.post_mlp_layerscale(out)
        return x + out


class Transformer(nn.Module):
    """``layers.{i}`` then ``final_layernorm``."""

    def __init__(self, dims: VitDims, opts: VitOptions, dtype: torch.dtype | None):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(dims, opts, i + 1, dtype) for i in range(dims.layers)
        )
        self.final_layernorm = nn.LayerNorm(dims.hidden, eps=opts.layernorm_epsilon, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)


class VitBackbone(nn.Module):
    """Patch embedding, class tokens, position embeddings, transformer; returns the first class
    token after ``final_layernorm``, ``[B, H]``."""

    def __init__(self, dims: VitDims, opts: VitOptions, dtype: torch.dtype | None):
        super().__init__()
        self.dims, self.opts = dims, opts
        h = dims.hidden
        self.cls_token = nn.Parameter(torch.zeros(1, dims.class_tokens, h, dtype=dtype))
        if opts.patch_embedding == "conv1":
            self.conv1 = nn.Conv2d(
                dims.channels, h, dims.patch, stride=dims.patch, bias=False, dtype=dtype
            )
        else:
            flat = dims.patch * dims.patch * dims.channels
            self.linear_encoder = nn.Linear(flat, h, dtype=dtype)
        if opts.position_embedding_type == "learned_absolute":
            weight = torch.empty(dims.seq_len, h, dtype=dtype)  # no reset_parameters(): below
            self.position_embeddings = nn.Embedding(dims.seq_len, h, _weight=weight)
            _init_normal(self.position_embeddings.weight, std=0.02)
        else:
            self.position_embeddings = nn.Parameter(torch.empty(dims.seq_len, h, dtype=dtype))
            _init_normal(self.position_embeddings, std=0.02)
        if opts.preprocess_layernorm:
            self.preprocess_layernorm = nn.LayerNorm(h, eps=opts.layernorm_epsilon, dtype=dtype)
        self.transformer = Transformer(dims, opts, dtype)

    def position_table(self) -> Tensor:
        """The ``[seq_len, H]`` position table, whichever way it is stored."""
        if isinstance(self.position_embeddings, nn.Embedding):
            return self.position_embeddings.weight
        return self.position_embeddings

    def embed(self, images: Tensor) -> Tensor:
        """``[B, C, img_h, img_w]`` -> ``[B, T + N, H]`` (class tokens first)."""
        if self.opts.patch_embedding == "conv1":
            tokens = patches_conv1(images, self.conv1.weight)
        else:
            enc = self.linear_encoder
            tokens = patches_linear(images, enc.weight, enc.bias, self.dims.patch)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat((cls, tokens), dim=1) + self.position_table()
        if self.opts.preprocess_layernorm:
            x = self.preprocess_layernorm(x)
        return x

    def forward(self, images: Tensor) -> Tensor:
        return self.transformer(self.embed(images))[:, 0]


class VitMlpHead(nn.Module):
    """NeMo's pretraining head: ``dense_out(tanh(dense_in(x)))``."""

    def __init__(self, hidden: int, num_classes: int, dtype: torch.dtype | None):
        super().__init__()
        self.dense_in = nn.Linear(hidden, hidden, dtype=dtype)
        self.dense_out = nn.Linear(hidden, num_classes, dtype=dtype)
        nn.init.constant_(self.dense_out.bias, -10.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_out(torch.tanh(self.dense_in(x)))


class VitNetwork(nn.Module):
    """NeMo's inner ``VitClassificationModel``: ``backbone`` and ``head``."""

    def __init__(self, dims: VitDims, opts: VitOptions, dtype: torch.dtype | None):
        super().__init__()
        self.backbone = VitBackbone(dims, opts, dtype)
        if opts.finetune:
            self.head: nn.Module = nn.Linear(dims.hidden, dims.num_classes, dtype=dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = VitMlpHead(dims.hidden, dims.num_classes, dtype)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


class VitClassificationModel(nn.Module):
    """NeMo's ``MegatronVitClassificationModel`` at TP=1, PP=1, for inference.

    ``state_dict()`` keys (all under ``model.``), order and shapes equal ``expected_shapes(config)``
    and NeMo's saved ``model_weights.ckpt``. ``forward`` runs in the parameters' dtype (images are
    cast to it) with eval semantics: dropout, drop-path and drop-patch are never applied.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        dtype: torch.dtype | None = None,
        path: str | None = None,
        weights: Iterable[str] | None = None,
    ) -> None:
        """``weights``: the key names of the weights about to be loaded, where the config may
        leave the layout unsaid (NeMo 1.23's ``linear_encoder``: see ``with_weights_layout``);
        ``cfg`` keeps ``config`` as given."""
        super().__init__()
        built = config if weights is None else with_weights_layout(config, weights)
        self.dims = vit_dims(built, path=path)
        self.opts = vit_options(built, path=path)
        self.cfg: dict[str, Any] = dict(config)
        self.model = VitNetwork(self.dims, self.opts, dtype)
        self.eval()

    @classmethod
    def restore_from(
        cls,
        restore_path: str,
        map_location: str | torch.device | None = None,
        checkpoint: str = "last",
        *,
        cache: RangeCache | str | None = None,
    ) -> VitClassificationModel:
        """Load a ``.nemo`` (any TP/PP, merged on load), an extracted folder or a training folder.

        ``cache``: a range cache folder that keeps (and reuses) what is read from object storage.
        """
        config, sd = load_state_dict(restore_path, checkpoint, cache)
        dtypes = {v.dtype for v in sd.values() if isinstance(v, torch.Tensor)}
        with torch.device("meta"):  # no random init of weights about to be replaced
            model = cls(
                config,
                dtype=dtypes.pop() if len(dtypes) == 1 else None,
                path=restore_path,
                weights=sd,
            )
        # the loaded tensors become the parameters (materialize made them: no second copy)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise CkptError(
                restore_path,
                f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}",
            )
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise CkptError(restore_path, f"weights do not fit the config: missing {left[:3]}")
        if map_location is not None:
            model.to(map_location)
        return model

    def save_to(
        self,
        save_path: str,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        overwrite: bool = True,
    ) -> str:
        """Write a ``.nemo`` exactly as NeMo lays it out, split to the given TP/PP."""
        config = dict(self.cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        sd = self.state_dict()
        cpu = type(sd)(
            (k, v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()
        )
        if hasattr(sd, "_metadata"):
            cpu._metadata = sd._metadata  # type: ignore[attr-defined]
        ck = Checkpoint.from_state_dicts(config, {(0, 0): cpu})
        plan = build_plan(ck, tensor_parallel_size, pipeline_parallel_size)
        package_nemo(nemo_members(ck, plan, allow_nonfinite=True), save_path, overwrite=overwrite)
        return save_path

    @property
    def dtype(self) -> torch.dtype:
        return self.model.backbone.cls_token.dtype

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, C, img_h, img_w]`` -> ``logits [B, num_classes]``."""
        check_images(images, self.dims)
        return self.model(images.to(self.dtype))
