"""HuggingFace-style folders: weight files (read lazily) and the transformers ViT format.

A Hub folder holds ``config.json`` beside its weights, one of (first found wins)::

    model.safetensors                               one safetensors file
    model.safetensors.index.json + shards           {"weight_map": {key: shard file name}}
    pytorch_model.bin                               a torch zip, read by ckptcore's restricted
    pytorch_model.bin.index.json + shards           unpickler (never torch.load)

transformers ``ViTForImageClassification`` keys as saved on disk (``L = vit.encoder.layer.{i}.``),
with the mapping roles (see ``mapping.py``) they make::

    vit.embeddings.cls_token                          [1, 1, H]      cls_token
    vit.embeddings.position_embeddings                [1, 1+N, H]    pos_embed
    vit.embeddings.patch_embeddings.projection.weight [H, C, P, P]   patch_weight
    vit.embeddings.patch_embeddings.projection.bias   [H]            patch_bias
    L layernorm_before.{weight,bias}                  [H]            ln1_w, ln1_b
    L attention.attention.{query,key,value}.weight    3 x [D, H]     qkv_w (concatenated q; k; v)
    L attention.attention.{query,key,value}.bias      3 x [D]        qkv_b (absent: qkv_bias false)
    L attention.output.dense.{weight,bias}            [H, D], [H]    proj_w, proj_b
    L layernorm_after.{weight,bias}                   [H]            ln2_w, ln2_b
    L intermediate.dense.{weight,bias}                [F, H], [F]    fc1_w, fc1_b
    L output.dense.{weight,bias}                      [H, F], [H]    fc2_w, fc2_b
    vit.layernorm.{weight,bias}                       [H]            norm_w, norm_b
    classifier.{weight,bias}                          [K, H], [K]    head_w, head_b
    vit.pooler.*, vit.embeddings.mask_token           ignored (not used by the classifier)
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from ckptcore.community.mapping import Arch, Geometry, KeyScheme
from ckptcore.dtypes import BY_SAFETENSORS, dtype_info, dtype_name
from ckptcore.errors import CkptError
from ckptcore.formats.torchzip import TorchFile, state_dict_of
from ckptcore.storage import ByteSource, get_fs, is_local, join, local_path, open_source

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_JSON_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20

Spec = tuple[torch.dtype, tuple[int, ...]]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    try:
        return bool(fs.isfile(path))
    except (OSError, ValueError):
        return False


def read_json(url: str, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from ``url``; ``CkptError`` naming the file if missing or malformed."""
    fs, path = get_fs(url)
    try:
        if not fs.isfile(path):
            raise CkptError(url, f"{what} not found")
        with fs.open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise CkptError(url, f"cannot read: {exc}") from None
    if len(data) > MAX_JSON_BYTES:
        raise CkptError(url, f"larger than {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CkptError(url, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CkptError(url, f"expected a JSON object, found {type(value).__name__}")
    return value


class _Safetensors:
    """One safetensors file: header parsed up front, tensors read on demand.

    Local files are read with ``safetensors.safe_open(..., framework="pt")``; remote ones with one
    ranged read per tensor.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.src: ByteSource = open_source(url)
        size = self.src.size
        if size < 8:
            raise CkptError(url, "not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", bytes(self.src.read(0, 8)))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CkptError(url, f"corrupt safetensors header size {n} (file has {size} bytes)")
        try:
            header = json.loads(bytes(self.src.read(8, n)))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CkptError(url, f"corrupt safetensors header: {exc}") from None
        if not isinstance(header, dict):
            raise CkptError(url, "corrupt safetensors header: not a JSON object")
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            self.entries[key] = self._entry(key, entry, size)
        self._handle: Any = None

    def _entry(
        self, key: str, entry: Any, size: int
    ) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            info = BY_SAFETENSORS[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CkptError(
                self.url, f"corrupt or unsupported safetensors entry {entry!r}", key
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        if min(shape, default=0) < 0 or end - start != numel * info.itemsize or start < 0:
            raise CkptError(self.url, f"safetensors entry {entry!r} is inconsistent", key)
        if self.base + end > size:
            raise CkptError(self.url, "truncated: tensor data runs past the end of the file", key)
        return info.torch_dtype, shape, start, end

    def tensor(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[key]
        if is_local(self.url):
            if self._handle is None:
                from safetensors import safe_open

                self._handle = safe_open(local_path(self.url), framework="pt")
            return self._handle.get_tensor(key)
        if end == start:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(self.src.read(self.base + start, end - start))
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._handle = None
        self.src.close()


class _TorchBin:
    """One ``pytorch_model.bin`` (torch zip) through ckptcore's restricted unpickler."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.file = TorchFile(open_source(url))
        sd = state_dict_of(self.file.obj, url)
        self.refs = {k: v for k, v in sd.items() if v is not None}
        self.entries = {k: (v.dtype, tuple(v.shape)) for k, v in self.refs.items()}

    def tensor(self, key: str) -> torch.Tensor:
        return self.file.tensor(self.refs[key])

    def close(self) -> None:
        self.file.src.close()


def _shard_names(index_url: str) -> dict[str, str]:
    index = read_json(index_url, "weight index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CkptError(index_url, "no weight_map in the index")
    for key, name in weight_map.items():
        if (
            not isinstance(name, str)
            or not name
            or name.startswith("/")
            or ".." in name.split("/")
            or "\\" in name
        ):
            raise CkptError(index_url, f"unsafe or invalid shard file name {name!r}", key)
    return weight_map


class WeightFiles:
    """The tensors of a Hub-style folder, by key: specs now, data on demand."""

    def __init__(self, folder: str) -> None:
        self.folder = folder.rstrip("/") if folder not in ("/",) else folder
        self._open: dict[str, _Safetensors | _TorchBin] = {}
        self._where: dict[str, str] = {}
        self.specs: dict[str, Spec] = {}
        self.files: list[tuple[str, int]] = []
        try:
            self._discover()
        except BaseException:
            self.close()
            raise

    def _discover(self) -> None:
        f = self.folder
        if exists(join(f, SAFETENSORS_NAME)):
            self._add(join(f, SAFETENSORS_NAME), _Safetensors, None)
        elif exists(join(f, SAFETENSORS_INDEX)):
            self._add_sharded(join(f, SAFETENSORS_INDEX), _Safetensors)
        elif exists(join(f, BIN_NAME)):
            self._add(join(f, BIN_NAME), _TorchBin, None)
        elif exists(join(f, BIN_INDEX)):
            self._add_sharded(join(f, BIN_INDEX), _TorchBin)
        else:
            raise CkptError(
                f,
                f"no weights: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {BIN_NAME} or "
                f"{BIN_INDEX}",
            )

    def _add(self, url: str, kind: type, only: set[str] | None) -> None:
        reader = kind(url)
        self._open[url] = reader
        size = reader.src.size if isinstance(reader, _Safetensors) else reader.file.src.size
        self.files.append((url, int(size)))
        for key, entry in reader.entries.items():
            if only is not None and key not in only:
                continue
            if key in self.specs:
                raise CkptError(url, f"tensor also stored in {self._where[key]}", key)
            self.specs[key] = (dtype_name(entry[0]).torch, tuple(entry[1]))  # torch dtypes here
            self._where[key] = url

    def _add_sharded(self, index_url: str, kind: type) -> None:
        weight_map = _shard_names(index_url)
        by_file: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(name, set()).add(key)
        for name, keys in sorted(by_file.items()):
            url = join(self.folder, name)
            self._add(url, kind, keys)
            missing = sorted(keys - set(self._open[url].entries))
            if missing:
                raise CkptError(
                    url, f"index {index_url} lists tensors this shard lacks", missing[0]
                )

    def file_of(self, key: str | None) -> str:
        """The file holding ``key`` (the weights file, or the folder, when unknown)."""
        if key is not None and key in self._where:
            return self._where[key]
        if len(self.files) == 1:
            return self.files[0][0]
        return self.folder

    def tensor(self, key: str) -> torch.Tensor:
        return self._open[self._where[key]].tensor(key)

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()


# --------------------------------------------------------------------------------------------
# The transformers ViT format
# --------------------------------------------------------------------------------------------

_L = "vit.encoder.layer.{i}."
_ATT = _L + "attention.attention."

HF_SCHEME = KeyScheme(
    name="transformers",
    keys={
        "cls_token": ("vit.embeddings.cls_token",),
        "pos_embed": ("vit.embeddings.position_embeddings",),
        "patch_weight": ("vit.embeddings.patch_embeddings.projection.weight",),
        "patch_bias": ("vit.embeddings.patch_embeddings.projection.bias",),
        "ln1_w": (_L + "layernorm_before.weight",),
        "ln1_b": (_L + "layernorm_before.bias",),
        "qkv_w": (_ATT + "query.weight", _ATT + "key.weight", _ATT + "value.weight"),
        "qkv_b": (_ATT + "query.bias", _ATT + "key.bias", _ATT + "value.bias"),
        "proj_w": (_L + "attention.output.dense.weight",),
        "proj_b": (_L + "attention.output.dense.bias",),
        "ln2_w": (_L + "layernorm_after.weight",),
        "ln2_b": (_L + "layernorm_after.bias",),
        "fc1_w": (_L + "intermediate.dense.weight",),
        "fc1_b": (_L + "intermediate.dense.bias",),
        "fc2_w": (_L + "output.dense.weight",),
        "fc2_b": (_L + "output.dense.bias",),
        "norm_w": ("vit.layernorm.weight",),
        "norm_b": ("vit.layernorm.bias",),
        "head_w": ("classifier.weight",),
        "head_b": ("classifier.bias",),
    },
    ignored=(r"^vit\.pooler\.", r"^vit\.embeddings\.mask_token$"),
)

# transformers hidden_act -> canonical activation (see mapping.ACTIVATIONS)
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu2": "squared_relu",
}
# canonical activation -> the hidden_act export writes
HF_ACTIVATION_OUT = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "quick_gelu": "quick_gelu",
    "squared_relu": "relu2",
}
# ViTConfig defaults, used for keys config.json leaves out
VIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
}
ARCHITECTURE = "ViTForImageClassification"


def _get(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key)
    return VIT_DEFAULTS[key] if value is None else value


def _positive(config: Mapping[str, Any], key: str, path: str) -> int:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CkptError(path, f"expected a positive integer, got {value!r}", key)
    return value


def _square(config: Mapping[str, Any], key: str, path: str) -> int:
    value = _get(config, key)
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise CkptError(
                path, f"non-square {key} {list(value)} is not supported (square only)", key
            )
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CkptError(path, f"expected a positive integer, got {value!r}", key)
    return value


def _num_labels(config: Mapping[str, Any], path: str) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    value = config.get("num_labels", 2)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CkptError(path, f"expected a positive number of labels, got {value!r}", "num_labels")
    return value


def hf_arch(config: Mapping[str, Any], path: str) -> Arch:
    """Read a transformers ``ViTForImageClassification`` ``config.json`` (``path`` labels errors).

    Refuses other model types and architectures, non-square images or patches, activations
    NeMo cannot run, and sizes that do not divide.
    """
    model_type = config.get("model_type")
    if model_type != "vit":
        raise CkptError(
            path,
            f"model_type {model_type!r} is not supported: only transformers ViT "
            f"({ARCHITECTURE}, model_type 'vit') converts",
            "model_type",
        )
    archs = config.get("architectures") or []
    if archs and ARCHITECTURE not in archs:
        raise CkptError(
            path,
            f"architectures {archs} is not supported: only {ARCHITECTURE} converts",
            "architectures",
        )
    hidden = _positive(config, "hidden_size", path)
    heads = _positive(config, "num_attention_heads", path)
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise CkptError(
                path,
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads}",
                "hidden_size",
            )
        head_dim = hidden // heads
    elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise CkptError(path, f"expected a positive integer, got {head_dim!r}", "head_dim")
    image = _square(config, "image_size", path)
    patch = _square(config, "patch_size", path)
    if image % patch:
        raise CkptError(
            path, f"image_size {image} is not divisible by patch_size {patch}", "image_size"
        )
    act = _get(config, "hidden_act")
    if act not in HF_ACTIVATIONS:
        raise CkptError(
            path,
            f"hidden_act {act!r} is not supported (supported: {', '.join(HF_ACTIVATIONS)})",
            "hidden_act",
        )
    eps = _get(config, "layer_norm_eps")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise CkptError(path, f"expected a positive number, got {eps!r}", "layer_norm_eps")
    g = Geometry(
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        ffn=_positive(config, "intermediate_size", path),
        layers=_positive(config, "num_hidden_layers", path),
        patch=patch,
        image=image,
        channels=_positive(config, "num_channels", path),
        classes=_num_labels(config, path),
    )
    return Arch(g, float(eps), HF_ACTIVATIONS[act])


def hf_scheme(config: Mapping[str, Any]) -> KeyScheme:
    """The key scheme for this config (q/k/v biases absent with ``qkv_bias: false``)."""
    if _get(config, "qkv_bias"):
        return HF_SCHEME
    return KeyScheme(HF_SCHEME.name, HF_SCHEME.keys, frozenset({"qkv_b"}), HF_SCHEME.ignored)


def hf_config(arch: Arch, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of an exported ``ViTForImageClassification``."""
    g = arch.geometry
    labels = {str(i): f"LABEL_{i}" for i in range(g.classes)}
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "vit",
        "hidden_size": g.hidden,
        "num_hidden_layers": g.layers,
        "num_attention_heads": g.heads,
        "intermediate_size": g.ffn,
        "hidden_act": HF_ACTIVATION_OUT[arch.activation],
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": arch.layernorm_epsilon,
        "image_size": g.image,
        "patch_size": g.patch,
        "num_channels": g.channels,
        "qkv_bias": True,
        "encoder_stride": g.patch,
        "id2label": labels,
        "label2id": {v: int(k) for k, v in labels.items()},
        "dtype": dtype_info(dtype).name,
    }
    if g.heads * g.head_dim != g.hidden:
        cfg["head_dim"] = g.head_dim  # read by transformers >= 5 (ViTAttention.head_dim)
    return cfg


def write_folder(
    folder: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into the existing local ``folder``."""
    from safetensors.torch import save_file

    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(dict(tensors), os.path.join(folder, SAFETENSORS_NAME), metadata={"format": "pt"})


__all__ = [
    "CONFIG_NAME",
    "HF_SCHEME",
    "WeightFiles",
    "hf_arch",
    "hf_config",
    "hf_scheme",
    "read_json",
    "write_folder",
]
