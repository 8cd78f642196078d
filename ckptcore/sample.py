"""Sample checkpoints: realistic NeMo ViT training folders and ``.nemo`` files of any size.

Tests, benchmarks and the demo use these instead of downloading anything. The training folder
matches what NeMo 2.3.2 training writes (a test holds it to the real files in
``tests/fixtures/nemo-2.3.2``): Lightning's top-level keys and their types, ``hyper_parameters``
itself an OmegaConf ``DictConfig`` of the form ``{cfg: {...}}``, Lightning 2.4's loop progress
records, Adam state per parameter in NeMo's two parameter groups (with and without weight decay),
NeMo's rank folders and file names, an optional ``-unfinished`` marker.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import torch

from ckptcore.layout import rank_folder
from ckptcore.model.vit import expected_shapes
from ckptcore.sources import Checkpoint

TARGET = "nemo.collections.vision.models.megatron_vit_classification_models.MegatronVitClassificationModel"

# NeMo's megatron_vit_classification_config.yaml model section, as the real fixture saved it.
BASE_CONFIG: dict[str, Any] = {
    "precision": 32,
    "micro_batch_size": 2,
    "global_batch_size": 2,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "restore_from_path": None,
    "vision_pretraining_type": "classify",
    "num_classes": 10,
    "patch_dim": 4,
    "img_h": 16,
    "img_w": 16,
    "classes_fraction": 1.0,
    "data_per_class_fraction": 1.0,
    "num_channels": 3,
    "drop_path_rate": 0.0,
    "encoder_seq_length": 16,
    "max_position_embeddings": 16,
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 256,
    "num_attention_heads": 4,
    "init_method_std": 0.02,
    "use_scaled_init_method": True,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "kv_channels": None,
    "apply_query_key_layer_scaling": True,
    "normalization": "layernorm",
    "layernorm_epsilon": 1e-05,
    "do_layer_norm_weight_decay": False,
    "pre_process": True,
    "post_process": True,
    "persist_layer_norm": False,
    "native_amp_init_scale": 4294967296,
    "native_amp_growth_interval": 1000,
    "hysteresis": 2,
    "fp32_residual_connection": False,
    "fp16_lm_cross_entropy": False,
    "megatron_amp_O2": False,
    "grad_allreduce_chunk_size_mb": 125,
    "grad_div_ar_fusion": True,
    "masked_softmax_fusion": False,
    "bias_dropout_add_fusion": False,
    "seed": 1234,
    "resume_from_checkpoint": None,
    "use_cpu_initialization": True,
    "onnx_safe": False,
    "apex_transformer_log_level": 30,
    "gradient_as_bucket_view": False,
    "gradient_accumulation_fusion": False,
    "openai_gelu": False,
    "bias_activation_fusion": False,
    "megatron_legacy": False,
    "activations_checkpoint_granularity": None,
    "activations_checkpoint_method": None,
    "activations_checkpoint_num_layers": None,
    "sequence_parallel": False,
    "data": {
        "data_path": ["/data/train", "/data/val"],
        "num_workers": 0,
        "dataloader_type": "cyclic",
        "validation_drop_last": True,
        "data_sharding": False,
    },
    "nsys_profile": {
        "enabled": False,
        "start_step": 10,
        "end_step": 10,
        "ranks": [0],
        "gen_shape": False,
    },
    "optim": {"name": "fused_adam", "lr": 0.0005, "weight_decay": 0.1, "betas": [0.9, 0.999]},
    "target": TARGET,
    "nemo_version": "2.3.2",
}

# Named sizes (hidden, layers, heads, ffn, patch, image).
SIZES = {
    "tiny": (64, 2, 4, 256, 4, 16),
    "small": (192, 4, 4, 768, 8, 32),
    "base": (768, 12, 12, 3072, 16, 224),
    "large": (1024, 24, 16, 4096, 16, 224),
    "huge": (1280, 32, 16, 5120, 14, 224),
}


def vit_config(
    size: str = "tiny",
    *,
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    ffn: int | None = None,
    patch: int | None = None,
    img: int | None = None,
    classes: int = 10,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> dict[str, Any]:
    """A NeMo ViT model config; ``size`` picks defaults, keywords override them."""
    h, n_layers, n_heads, f, p, image = SIZES[size]
    cfg = dict(BASE_CONFIG)
    cfg.update(
        hidden_size=hidden or h,
        num_layers=layers or n_layers,
        num_attention_heads=heads or n_heads,
        ffn_hidden_size=ffn or f,
        patch_dim=patch or p,
        img_h=img or image,
        img_w=img or image,
        num_classes=classes,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    seq = (cfg["img_h"] // cfg["patch_dim"]) * (cfg["img_w"] // cfg["patch_dim"])
    cfg["encoder_seq_length"] = cfg["max_position_embeddings"] = seq
    if dtype != torch.float32:
        cfg["precision"] = "bf16" if dtype == torch.bfloat16 else 16
        cfg["megatron_amp_O2"] = True
    cfg.update(overrides)
    return cfg


def random_state_dict(
    config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
) -> collections.OrderedDict:
    """A TP=1 state dict with NeMo's keys and random values (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    sd: collections.OrderedDict = collections.OrderedDict()
    for key, shape in expected_shapes(config, tp=1).items():
        if shape is None:
            sd[key] = None
            continue
        t = torch.randn(shape, generator=g) * 0.05
        if "layernorm.weight" in key or key.endswith("gamma"):
            t += 1.0
        sd[key] = t.to(dtype)
    return sd


def shard(
    config: dict[str, Any], sd: dict, tp: int, pp: int
) -> dict[tuple[int, int], collections.OrderedDict]:
    """Split a TP=1 state dict into NeMo's per-rank state dicts with the partition rules."""
    from ckptcore.engine import materialize
    from ckptcore.plan import build_plan

    cfg = dict(config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    ck = Checkpoint.from_state_dicts(cfg, {(0, 0): sd})
    plan = build_plan(ck, tp, pp)
    return {(fp.tp_rank, fp.pp_rank): materialize(ck, fp) for fp in plan.files}


def checkpoint_name(step: int, global_batch_size: int, last: bool) -> str:
    suffix = "-last" if last else ""
    return f"megatron_vit_classification--val_loss=0.50-step={step}-consumed_samples={float(step * global_batch_size)}{suffix}.ckpt"


def _decays(key: str) -> bool:
    """NeMo's weight-decay split: biases and norm weights go to the group without decay."""
    return not (key.endswith("bias") or "layernorm" in key)


def _adam_state(sd: dict, step: int, g: torch.Generator, half: bool) -> dict:
    named = [(k, v) for k, v in sd.items() if isinstance(v, torch.Tensor)]
    # NeMo's two parameter groups: with weight decay first, then without; indices run on
    ordered = [(k, v) for k, v in named if _decays(k)] + [
        (k, v) for k, v in named if not _decays(k)
    ]
    tensors = [v for _, v in ordered]
    split = sum(1 for k, _ in named if _decays(k))
    state = {}
    for i, t in enumerate(tensors):
        state[i] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.randn(t.shape, generator=g, dtype=torch.float32) * 1e-3,
            "exp_avg_sq": torch.rand(t.shape, generator=g, dtype=torch.float32) * 1e-6,
        }

    def group(weight_decay: float, params: list[int]) -> dict:
        return {
            "is_expert": False,
            "lr": 5e-4,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": weight_decay,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": False,
            "params": params,
        }

    groups = [group(0.1, list(range(split))), group(0.0, list(range(split, len(tensors))))]
    opt = {"state": state, "param_groups": groups}
    if half:
        masters = [_master_copy(k, v) for k, v in ordered]
        return {"optimizer": opt, "fp32_from_fp16_params": [masters[:split], masters[split:]]}
    return opt


def _master_copy(key: str, value: torch.Tensor) -> torch.Tensor:
    """An O2 fp32 master copy as NeMo saves it: a float tensor carrying megatron's partition
    attributes (which is why torch pickles it through ``_rebuild_from_type_v2``); the split
    dim is the partition rule table's."""
    from ckptcore.rules.megatron_vit import VIT

    rule = VIT.rule_for(key)
    dim = None if rule is None else rule.split_dim
    master = value.float()
    master.tensor_model_parallel = dim is not None
    master.partition_dim = -1 if dim is None else dim
    master.partition_stride = 1
    return master


def _progress(n: int, *fields: str) -> dict:
    return {"total": dict.fromkeys(fields, n), "current": dict.fromkeys(fields, n)}


def _loops(step: int) -> dict:
    """Lightning 2.4's loop progress after ``step`` optimizer steps in one epoch, no validation."""
    batches = ("ready", "completed", "started", "processed")

    def eval_loop(last: bool = True) -> dict:
        progress: dict[str, Any] = _progress(0, *batches)
        if last:
            progress["is_last_batch"] = False
        return {"state_dict": {}, "batch_progress": progress}

    return {
        "fit_loop": {
            "state_dict": {},
            "epoch_loop.state_dict": {"_batches_that_stepped": step},
            "epoch_loop.batch_progress": {**_progress(step, *batches), "is_last_batch": False},
            "epoch_loop.scheduler_progress": _progress(0, "ready", "completed"),
            "epoch_loop.automatic_optimization.state_dict": {},
            "epoch_loop.automatic_optimization.optim_progress": {
                "optimizer": {
                    "step": _progress(step, "ready", "completed"),
                    "zero_grad": _progress(step, "ready", "completed", "started"),
                }
            },
            "epoch_loop.manual_optimization.state_dict": {},
            "epoch_loop.manual_optimization.optim_step_progress": _progress(
                0, "ready", "completed"
            ),
            "epoch_loop.val_loop.state_dict": {},
            "epoch_loop.val_loop.batch_progress": {
                **_progress(0, *batches),
                "is_last_batch": False,
            },
            "epoch_progress": _progress(1, *batches),
        },
        "validate_loop": eval_loop(),
        "test_loop": eval_loop(),
        "predict_loop": eval_loop(last=False),
    }


def _trained_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype of the weights NeMo trains with ``config``: half only under megatron_amp_O2
    (mixed precision without it keeps fp32 weights)."""
    if not config.get("megatron_amp_O2"):
        return torch.float32
    precision = str(config.get("precision", 32))
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def write_training_checkpoint(
    folder: str,
    config: dict[str, Any],
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype | None = None,
    optimizer: bool = True,
    step: int = 100,
    epoch: int = 1,
    last: bool = True,
    seed: int = 0,
    state_dict: dict | None = None,
    unfinished: bool = False,
) -> tuple[str, collections.OrderedDict]:
    """Write one checkpoint (all ranks) into a NeMo training ``checkpoints/`` folder.

    Returns the checkpoint file name and the TP=1 state dict it was made from. ``dtype``: the
    weights' dtype; by default what NeMo trains with the config: half precision weights (and
    fp32 master copies in the optimizer state) only with ``megatron_amp_O2``, fp32 otherwise.
    """
    from omegaconf import DictConfig, OmegaConf

    cfg = dict(config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if dtype is None:
        dtype = _trained_dtype(cfg)
    if dtype != torch.float32:
        cfg.setdefault("precision", "bf16" if dtype == torch.bfloat16 else 16)
    full = state_dict if state_dict is not None else random_state_dict(cfg, seed, dtype)
    shards = shard(cfg, full, tp, pp)
    name = checkpoint_name(step, int(cfg.get("global_batch_size", 1)), last)
    g = torch.Generator().manual_seed(seed + 1)
    os.makedirs(folder, exist_ok=True)
    for (t, p), sd in shards.items():
        sub = rank_folder(t, p, tp, pp)
        target_dir = folder if sub is None else os.path.join(folder, sub)
        os.makedirs(target_dir, exist_ok=True)
        ckpt = {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": sd,
            "loops": _loops(step),
            "callbacks": {},
            "optimizer_states": [_adam_state(sd, step, g, dtype != torch.float32)]
            if optimizer
            else [],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            # NeMo's ModelPT saves hyper_parameters itself as a DictConfig {cfg: {...}}
            "hyper_parameters": OmegaConf.create({"cfg": cfg}),
            "hparams_type": DictConfig,
        }
        # Lightning saves through a buffer, so the zip records sit under "archive/".
        with open(os.path.join(target_dir, name), "wb") as f:
            torch.save(ckpt, f)
    if unfinished:
        open(os.path.join(folder, name[: -len(".ckpt")] + "-unfinished"), "wb").close()
    return name, full


def write_nemo(
    path: str,
    config: dict[str, Any],
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    state_dict: dict | None = None,
) -> collections.OrderedDict:
    """Write a sample ``.nemo`` at ``path``; returns the TP=1 state dict it holds."""

    from ckptcore.nemo_io import nemo_members, package_nemo
    from ckptcore.plan import build_plan

    cfg = dict(config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    full = state_dict if state_dict is not None else random_state_dict(cfg, seed, dtype)
    ck = Checkpoint.from_state_dicts(cfg, {(0, 0): full})
    plan = build_plan(ck, tp, pp)
    package_nemo(nemo_members(ck, plan, allow_nonfinite=True), path, overwrite=True)
    return full


# Shape-only presets for planning at scale (ViT-shaped, sized like today's large LLMs).
PLANNING_SIZES = {
    "vit-70b": dict(hidden=8192, layers=80, heads=64, ffn=28672, patch=16, img=224, classes=1000),
    "vit-405b": dict(
        hidden=16384, layers=126, heads=128, ffn=53248, patch=16, img=224, classes=1000
    ),
}


def shape_only_checkpoint(
    preset: str, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.bfloat16
) -> Checkpoint:
    """A checkpoint of ``preset`` size split to TP x PP whose tensors have shapes but no data:
    enough to build plans and work items for models far larger than this machine's memory."""
    from ckptcore.errors import CkptError
    from ckptcore.sources import LazyTensor

    if preset in PLANNING_SIZES:
        cfg = vit_config("tiny", **PLANNING_SIZES[preset], dtype=dtype)
    elif preset in SIZES:
        cfg = vit_config(preset, dtype=dtype)
    else:
        raise CkptError(
            None,
            f"unknown size preset {preset!r} (choose from {', '.join([*SIZES, *PLANNING_SIZES])})",
        )

    def no_data() -> torch.Tensor:
        raise CkptError(None, "a shape-only checkpoint has no tensor data")

    full = collections.OrderedDict(
        (k, None if s is None else LazyTensor(dtype, tuple(s), no_data))
        for k, s in expected_shapes(cfg, tp=1).items()
    )
    ck1 = Checkpoint.from_state_dicts(
        dict(cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1),
        {(0, 0): full},
        url=preset,
    )
    if tp == 1 and pp == 1:
        return ck1
    from ckptcore.plan import build_plan

    plan = build_plan(ck1, tp, pp)
    shards = {}
    for fp in plan.files:
        shards[(fp.tp_rank, fp.pp_rank)] = collections.OrderedDict(
            (t.key, None if t.spec is None else LazyTensor(t.spec.dtype, t.spec.shape, no_data))
            for t in fp.tensors
        )
    cfg = dict(cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return Checkpoint.from_state_dicts(cfg, shards, url=preset)
