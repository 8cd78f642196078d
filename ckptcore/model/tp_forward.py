"""Run a NeMo ViT the tensor-parallel way, straight from its TP shards, in one process.

``shards[r]`` is rank r's state dict (``mp_rank_{r:02d}/model_weights.ckpt``), laid out as NeMo's
TP split (see ``expected_shapes(config, tp)``):

- column-parallel, cut on dim 0: ``query_key_value`` and ``dense_h_to_4h`` weight and bias. Rank r
  holds heads ``[r*n/TP, (r+1)*n/TP)``; its q/k/v rows are ``[n/TP, 3, hn]`` (per head q, k, v), or
  ``[3, n/TP, hn]`` with ``megatron_legacy: True``. It holds ffn rows ``[r*F/TP, (r+1)*F/TP)``.
- row-parallel, cut on dim 1: ``self_attention.dense.weight`` and ``dense_4h_to_h.weight``.
- everything else, including the row-parallel biases, is replicated on every rank.

Each rank computes attention only for its own heads and the MLP only for its own ffn slice, from
its own shard; the row-parallel outputs are summed over ranks (the all-reduce) and the replicated
bias is added once. No full tensor is ever rebuilt from the shards, so a shard with a wrong layout
(for example block q/k/v rows in a non-legacy model) gives wrong logits instead of being repaired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ckptcore.errors import CkptError
from ckptcore.model.vit import (
    ACTIVATION_FUNCS,
    BACKBONE,
    HEAD,
    VitDims,
    VitOptions,
    attention_partial,
    check_images,
    expected_shapes,
    mlp_partial,
    patches_conv1,
    patches_linear,
    vit_dims,
    vit_options,
    with_weights_layout,
)

Shard = Mapping[str, Tensor | None]


def _check_shards(
    config: Mapping[str, Any], shards: Sequence[Shard], path: str | None
) -> dict[str, tuple[int, ...] | None]:
    """Check every rank holds every key with its per-rank shape; returns the expected shapes."""
    if not shards:
        raise CkptError(path, "no tensor-parallel shards given")
    shapes = expected_shapes(config, len(shards), path=path)
    for rank, shard in enumerate(shards):
        where = f"{path}: rank {rank}" if path else f"rank {rank}"
        for key, shape in shapes.items():
            if shape is None:
                continue
            if key not in shard:
                raise CkptError(where, "missing tensor", key)
            tensor = shard[key]
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
                got = list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise CkptError(where, f"expected shape {list(shape)}, got {got}", key)
    return shapes


def _check_replicas(shards: Sequence[Shard], shapes: Mapping[str, Any], path: str | None) -> None:
    """Raise ``CkptError`` if a replicated tensor differs between ranks."""
    for key, shape in shapes.items():
        if shape is None or _split_dim(key) is not None:
            continue
        first = shards[0][key]
        for rank in range(1, len(shards)):
            if not torch.equal(first, shards[rank][key]):
                where = f"{path}: rank {rank}" if path else f"rank {rank}"
                raise CkptError(where, "replicated tensor differs from rank 0", key)


def _split_dim(key: str) -> int | None:
    """The dim NeMo cuts ``key`` on (0 column-parallel, 1 row-parallel weight), None if replicated."""
    if key.endswith(("query_key_value.weight", "query_key_value.bias")):
        return 0
    if key.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias")):
        return 0
    if key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return 1
    return None


def _embed(rep: Shard, images: Tensor, dims: VitDims, opts: VitOptions) -> Tensor:
    """Patch + class tokens + positions (+ preprocess LN) from replicated tensors: [B, T+N, H]."""
    if opts.patch_embedding == "conv1":
        tokens = patches_conv1(images, rep[BACKBONE + "conv1.weight"])
    else:
        weight, bias = (
            rep[BACKBONE + "linear_encoder.weight"],
            rep[BACKBONE + "linear_encoder.bias"],
        )
        tokens = patches_linear(images, weight, bias, dims.patch)
    cls = rep[BACKBONE + "cls_token"].expand(tokens.shape[0], -1, -1)
    if opts.position_embedding_type == "learned_absolute":
        positions = rep[BACKBONE + "position_embeddings.weight"]
    else:
        positions = rep[BACKBONE + "position_embeddings"]
    x = torch.cat((cls, tokens), dim=1) + positions
    if opts.preprocess_layernorm:
        x = _layer_norm(x, rep, BACKBONE + "preprocess_layernorm.", opts)
    return x


def _layer_norm(x: Tensor, rep: Shard, prefix: str, opts: VitOptions) -> Tensor:
    weight, bias = rep[prefix + "weight"], rep[prefix + "bias"]
    return F.layer_norm(x, weight.shape, weight, bias, opts.layernorm_epsilon)


def _layer(x: Tensor, shards: Sequence[Shard], i: int, dims: VitDims, opts: VitOptions) -> Tensor:
    """One pre-LN transformer layer, attention and MLP split over the ranks."""
    t = f"{BACKBONE}transformer.layers.{i}."
    rep = shards[0]
    coeff = float(i + 1) if opts.query_key_layer_scaling else 1.0
    activation = ACTIVATION_FUNCS[opts.activation]

    h = _layer_norm(x, rep, t + "input_layernorm.", opts)
    partials = [
        attention_partial(
            h,
            s[t + "self_attention.query_key_value.weight"],
            s[t + "self_attention.query_key_value.bias"],
            s[t + "self_attention.dense.weight"],
            dims.head_dim,
            opts.megatron_legacy,
            coeff,
        )
        for s in shards
    ]
    out = _all_reduce(partials) + rep[t + "self_attention.dense.bias"]
    if opts.layerscale:
        out = out * rep[t + "post_attention_layerscale.gamma"]
    x = x + out

    h = _layer_norm(x, rep, t + "post_attention_layernorm.", opts)
    partials = [
        mlp_partial(
            h,
            s[t + "mlp.dense_h_to_4h.weight"],
            s[t + "mlp.dense_h_to_4h.bias"],
            s[t + "mlp.dense_4h_to_h.weight"],
            activation,
        )
        for s in shards
    ]
    out = _all_reduce(partials) + rep[t + "mlp.dense_4h_to_h.bias"]
    if opts.layerscale:
        out = out * rep[t + "post_mlp_layerscale.gamma"]
    return x + out


def _all_reduce(partials: Sequence[Tensor]) -> Tensor:
    """Sum of the ranks' row-parallel partial outputs, in rank order."""
    total = partials[0]
    for part in partials[1:]:
        total = total + part
    return total


def _head(x: Tensor, rep: Shard, opts: VitOptions) -> Tensor:
    if opts.finetune:
        return F.linear(x, rep[HEAD + "weight"], rep[HEAD + "bias"])
    hidden = torch.tanh(F.linear(x, rep[HEAD + "dense_in.weight"], rep[HEAD + "dense_in.bias"]))
    return F.linear(hidden, rep[HEAD + "dense_out.weight"], rep[HEAD + "dense_out.bias"])


@torch.no_grad()
def forward_tensor_parallel(
    config: Mapping[str, Any],
    shards: Sequence[Shard],
    images: Tensor,
    *,
    check_replicas: bool = True,
    path: str | None = None,
) -> Tensor:
    """Logits ``[B, num_classes]`` for ``images [B, C, img_h, img_w]`` from TP shards.

    ``shards`` are the per-rank state dicts in rank order (TP = ``len(shards)``; TP=1 is the full
    model). Replicated tensors are read from rank 0; with ``check_replicas`` every rank's copy must
    be identical. Runs in rank 0's ``cls_token`` dtype. Raises ``CkptError`` if a key is missing,
    a shape is not the per-rank shape, a replica differs, or the images do not fit the config.
    """
    if shards:
        config = with_weights_layout(config, shards[0])
    dims = vit_dims(config, path=path)
    opts = vit_options(config, path=path)
    shapes = _check_shards(config, shards, path)
    if check_replicas:
        _check_replicas(shards, shapes, path)
    check_images(images, dims)
    rep = shards[0]
    x = _embed(rep, images.to(rep[BACKBONE + "cls_token"].dtype), dims, opts)
    for i in range(dims.layers):
        x = _layer(x, shards, i, dims, opts)
    x = _layer_norm(x, rep, BACKBONE + "transformer.final_layernorm.", opts)
    return _head(x[:, 0], rep, opts)
