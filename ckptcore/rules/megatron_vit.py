"""NeMo's Megatron ViT classifier (``MegatronVitClassificationModel``): its partition table.

Keys are the state-dict keys with the ``model.`` prefix. Column-parallel tensors split on dim 0,
row-parallel weights on dim 1, everything else is replicated. See nemo-formats.md §2 and §4.3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptcore.errors import CkptError
from ckptcore.rules.table import Family, Rule, Stage

TARGET = "nemo.collections.vision.models.megatron_vit_classification_models.MegatronVitClassificationModel"

L = "{L}"  # model.backbone.transformer.layers.<n>.
_EXTRA = r"\._extra_state"

RULES = (
    # first stage: patch and position embeddings, class tokens
    Rule(r"model\.backbone\.cls_token", Stage.FIRST),
    Rule(r"model\.backbone\.conv1\.weight", Stage.FIRST),
    Rule(r"model\.backbone\.linear_encoder\.(weight|bias)", Stage.FIRST),
    Rule(r"model\.backbone\.position_embeddings(\.weight)?", Stage.FIRST),
    Rule(r"model\.backbone\.preprocess_layernorm\.(weight|bias)", Stage.FIRST),
    # per layer: column-parallel (dim 0), row-parallel (dim 1), replicated
    Rule(
        L + r"self_attention\.query_key_value\.(weight|bias)",
        Stage.LAYER,
        split_dim=0,
        groups=3,
        groups_when="megatron_legacy",
        note="rows are [heads, 3, head_dim]; legacy [3, heads, head_dim] splits strided",
    ),
    Rule(L + r"mlp\.dense_h_to_4h\.(weight|bias)", Stage.LAYER, split_dim=0),
    Rule(L + r"self_attention\.dense\.weight", Stage.LAYER, split_dim=1),
    Rule(L + r"mlp\.dense_4h_to_h\.weight", Stage.LAYER, split_dim=1),
    Rule(L + r"self_attention\.dense\.bias", Stage.LAYER),
    Rule(L + r"mlp\.dense_4h_to_h\.bias", Stage.LAYER),
    Rule(L + r"(input_layernorm|post_attention_layernorm)\.(weight|bias)", Stage.LAYER),
    Rule(L + r"(post_attention_layerscale|post_mlp_layerscale)\.gamma", Stage.LAYER),
    Rule(
        L
        + r"(self_attention\.query_key_value|self_attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)"
        + _EXTRA,
        Stage.LAYER,
    ),
    # last stage: final norm and classification head
    Rule(r"model\.backbone\.transformer\.final_layernorm\.(weight|bias)", Stage.LAST),
    Rule(r"model\.head\.(weight|bias)", Stage.LAST),
    Rule(r"model\.head\.(dense_in|dense_out)\.(weight|bias)", Stage.LAST),
)


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
    from ckptcore.model.config import expected_shapes

    return expected_shapes(dict(config), tp=1)


def _weights_layout(config: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    from ckptcore.model.config import with_weights_layout

    return with_weights_layout(config, keys)


def _check_target(config: Mapping[str, Any], tp: int, pp: int) -> None:
    heads = int(config.get("num_attention_heads", 0))
    ffn = int(config.get("ffn_hidden_size", 0))
    if heads % tp:
        raise CkptError(None, f"target TP={tp} does not divide num_attention_heads={heads}")
    if ffn % tp:
        raise CkptError(None, f"target TP={tp} does not divide ffn_hidden_size={ffn}")


VIT = Family(
    name="megatron_vit",
    targets=(TARGET,),
    layer_prefix=r"model\.backbone\.transformer\.layers\.",
    rules=RULES,
    expected_shapes=_expected_shapes,
    check_target=_check_target,
    weights_layout=_weights_layout,
    default_target=TARGET,
)
