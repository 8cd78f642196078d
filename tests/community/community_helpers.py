"""Tiny community ViTs built in-process: transformers models, timm-format folders, a timm reference.

Nothing here downloads anything. timm itself is optional: :func:`load_timm` returns it when it can
be imported (see the module docstring of ``test_timm.py``), else None.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

# ------------------------------------------------------------------------------ transformers


def randomize(module: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Perturb every parameter (so biases and norms are not their 0/1 initial values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make_hf(folder: str, seed: int = 0, **config: Any):
    """A random ``ViTForImageClassification`` saved to ``folder``; returns the model (eval)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**config)).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


def hf_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=images).logits


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


def safetensors_to_bin(folder: str) -> None:
    """Replace ``model.safetensors`` by a ``pytorch_model.bin`` with the same (on-disk) keys."""
    path = os.path.join(folder, "model.safetensors")
    torch.save(load_file(path), os.path.join(folder, "pytorch_model.bin"))
    os.unlink(path)


def shard_safetensors(folder: str, shards: int = 3) -> None:
    """Split ``model.safetensors`` into ``shards`` files plus ``model.safetensors.index.json``."""
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    os.unlink(path)


# ------------------------------------------------------------------------------ timm format


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.act == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        elif self.act == "quick_gelu":
            x = x * torch.sigmoid(1.702 * x)
        else:
            x = F.gelu(x)
        return self.fc2(x)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, qkv_bias: bool, act: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, ffn, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmReference(nn.Module):
    """timm ``VisionTransformer``'s eval forward and state-dict keys (class token, token pooling,
    LayerNorm eps 1e-6), written from timm's ``vision_transformer.py`` without importing timm."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        img_size: int,
        patch_size: int,
        in_chans: int = 3,
        num_classes: int,
        qkv_bias: bool = True,
        no_embed_class: bool = False,
        act_layer: str | None = None,
    ) -> None:
        super().__init__()
        n = (img_size // patch_size) ** 2
        self.no_embed_class = no_embed_class
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n if no_embed_class else n + 1, embed_dim))
        self.patch_embed = _PatchEmbed(in_chans, embed_dim, patch_size)
        ffn = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, ffn, qkv_bias, act_layer or "gelu") for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:
            x = torch.cat((cls, x + self.pos_embed), dim=1)
        else:
            x = torch.cat((cls, x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def timm_hub_config(model_args: dict[str, Any], architecture: str = "vit_tiny_patch16_224") -> dict:
    """A ``config.json`` as timm 1.0.31's ``save_for_hf`` writes it (checked against it)."""
    img = model_args.get("img_size", 224)
    chans = model_args.get("in_chans", 3)
    args = dict(model_args, img_size=[img, img], in_chans=chans, global_pool="token")
    return {
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "num_features": model_args.get("embed_dim", 192),
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {
            "tag": "augreg_in21k_ft_in1k",
            "custom_load": False,
            "input_size": [chans, img, img],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "crop_mode": "center",
            "mean": [0.5] * chans,
            "std": [0.5] * chans,
            "num_classes": model_args["num_classes"],
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        },
    }


def write_timm_folder(
    folder: str, model: nn.Module, config: dict[str, Any], weights: str = "safetensors"
) -> None:
    """A timm Hub folder: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``)."""
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def make_timm_reference(folder: str, seed: int, **model_args: Any) -> TimmReference:
    torch.manual_seed(seed)
    model = TimmReference(**model_args).eval()
    randomize(model, seed)
    write_timm_folder(folder, model, timm_hub_config(model_args))
    return model


# ------------------------------------------------------------------------------ real timm


class _StubModule(types.ModuleType):
    """A stand-in torchvision module: any attribute is a placeholder class."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            import enum

            value: Any = enum.Enum(
                "InterpolationMode", "NEAREST NEAREST_EXACT BILINEAR BICUBIC BOX HAMMING LANCZOS"
            )
        else:
            value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


def _purge(*packages: str) -> None:
    for name in [n for n in sys.modules if n.split(".", 1)[0] in packages]:
        del sys.modules[name]


def load_timm():
    """The real ``timm`` module, or None when it is not installed.

    timm imports torchvision at import time, only for data transforms and ``FrozenBatchNorm2d``;
    the ViT model code never calls it. PyPI's torchvision builds for torch 2.13 need CUDA torch
    (importing one next to the CPU torch fails), so when torchvision is missing or broken a
    placeholder package stands in while timm is imported, and is removed from ``sys.modules``
    afterwards.
    """
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as exc:
        if exc.name not in ("torchvision", None) and not str(exc.name).startswith("torchvision"):
            return None
    except Exception:  # noqa: BLE001 - a torchvision that fails to load (CUDA build)
        pass
    _purge("timm", "torchvision")
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError:
        return None
    finally:
        sys.meta_path.remove(finder)
        _purge("torchvision")
