"""Community ViT checkpoints <-> ``.nemo``: :func:`import_hf` and :func:`export_hf`.

Import opens the source as a :class:`~ckptcore.sources.Checkpoint` of kind ``hf`` or ``timm``
with one rank (0, 0) whose values are :class:`~ckptcore.sources.LazyTensor` in NeMo's key order
(``expected_shapes``); each reads only the source tensors its table row needs. The checkpoint then
goes through the same plan and engine as :func:`ckptcore.api.convert` (any target TP/PP).

Export merges any ``.nemo`` to TP=1/PP=1 (:func:`ckptcore.api.load_state_dict`), inverts the table
and writes ``config.json`` + ``model.safetensors`` that ``ViTForImageClassification`` loads with
no missing or unexpected keys. With the conv1 layout the patch bias was folded into the position
table on import; export writes a zero patch bias and keeps the fold (same logits). With the
linear_encoder layout HF -> .nemo -> HF gives back every tensor unchanged.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import torch

from ckptcore.api import (
    ConvertReport,
    Progress,
    VerifyReport,
    load_state_dict,
    restore_model,
    sample_images,
    write_converted,
)
from ckptcore.community import hf as hf_fmt
from ckptcore.community import timm as timm_fmt
from ckptcore.community.mapping import (
    LAYOUTS,
    Arch,
    KeyScheme,
    RoleReader,
    bind_rows,
    from_nemo,
    nemo_config,
    nemo_variant,
    split_role,
    to_nemo,
)
from ckptcore.dtypes import parse_precision
from ckptcore.errors import CkptError, write_error
from ckptcore.model.vit import expected_shapes, with_weights_layout
from ckptcore.output import check_destination, same_location
from ckptcore.plan import build_plan
from ckptcore.sources import Checkpoint, LazyTensor, SourceRank
from ckptcore.storage import get_fs, is_local, join, local_path

SOURCE_KINDS = ("transformers", "timm")


def detect_kind(config: dict[str, Any], path: str) -> str:
    """``transformers`` or ``timm`` from a ``config.json`` (``path`` labels errors)."""
    if timm_fmt.is_timm_config(config):
        return "timm"
    if "model_type" in config or "architectures" in config:
        return "transformers"
    raise CkptError(
        path,
        "neither a transformers config (model_type, architectures) nor a timm one "
        "(architecture, pretrained_cfg, model_args); pass source_kind to choose",
    )


def _arch_and_scheme(
    kind: str, config: dict[str, Any], config_url: str, weights: hf_fmt.WeightFiles
) -> tuple[Arch, KeyScheme]:
    if kind == "timm":
        arch, scheme = timm_fmt.timm_arch(config, config_url)
        timm_fmt.check_weight_keys(weights.specs, weights.file_of(None))
        return arch, scheme
    return hf_fmt.hf_arch(config, config_url), hf_fmt.hf_scheme(config)


def open_community(
    source: str, layout: str = "conv1", source_kind: str | None = None
) -> Checkpoint:
    """A community ViT folder (local or fsspec URL) as a lazily mapped NeMo ``Checkpoint``.

    The checkpoint has ``kind`` ``hf`` or ``timm``, TP=PP=1, one rank (0, 0) whose state is
    NeMo's TP=1 state dict for the mapped config: ``LazyTensor`` values (``None`` for
    ``_extra_state``). Close it (or use ``with``) to release the weight files.
    """
    if layout not in LAYOUTS:
        raise CkptError(None, f"unknown layout {layout!r} (choose one of: {', '.join(LAYOUTS)})")
    if source_kind not in (None, *SOURCE_KINDS):
        raise CkptError(
            None, f"unknown source_kind {source_kind!r} (choose transformers, timm or None)"
        )
    fs, path = get_fs(source)
    try:
        is_dir = fs.isdir(path)
        found = is_dir or fs.exists(path)
    except (OSError, ValueError) as exc:
        raise CkptError(source, f"cannot access: {exc}") from None
    if not found:
        raise CkptError(source, "not found")
    if not is_dir:
        raise CkptError(source, "not a folder (expected config.json beside the weights)")
    config_url = join(source, hf_fmt.CONFIG_NAME)
    config = hf_fmt.read_json(config_url, "config.json")
    config_size = int(fs.size(get_fs(config_url)[1]) or 0)
    kind = source_kind or detect_kind(config, config_url)
    weights = hf_fmt.WeightFiles(source)
    try:
        arch, scheme = _arch_and_scheme(kind, config, config_url, weights)
        reader = RoleReader(scheme, arch.geometry, weights.specs, weights.tensor, weights.file_of)
        reader.check()
        dtype = reader.dtype("cls_token")
        nemo_cfg = nemo_config(arch, layout, dtype)
        state = _lazy_state(nemo_cfg, reader, layout, config_url)
    except BaseException:
        weights.close()
        raise
    name = "hf" if kind == "transformers" else "timm"
    rank = SourceRank(0, 0, source, state, None)
    notes = list(reader.notes)
    if layout == "conv1":
        notes.append("patch-embedding bias folded into the patch rows of the position table")
    return Checkpoint(
        url=source,
        kind=name,
        config=nemo_cfg,
        tp=1,
        pp=1,
        ranks={(0, 0): rank},
        files=[(config_url, config_size), *weights.files],
        notes=notes,
        _cleanup=[weights.close],
    )


def _lazy_state(
    config: dict[str, Any], reader: RoleReader, layout: str, path: str
) -> collections.OrderedDict:
    g = reader.g
    bound = bind_rows(g.layers, layout, legacy=False)
    state: collections.OrderedDict = collections.OrderedDict()
    for key, shape in expected_shapes(config, tp=1, path=path).items():
        if shape is None:
            state[key] = None
            continue
        b = bound.get(key)
        if b is None:  # a defect of the table, not of the input
            raise CkptError(None, "the mapping table has no row for this NeMo key", key)
        dtype = reader.dtype(b.role_keys[0])

        def load(b=b, dtype=dtype) -> torch.Tensor:
            return to_nemo(b, reader.read, g).to(dtype)

        state[key] = LazyTensor(dtype, tuple(shape), load)
    return state


def import_hf(
    source: str,
    dest: str,
    target_tp: int | None = None,
    target_pp: int | None = None,
    layout: str = "conv1",
    source_kind: str | None = None,
    precision: str | int | None = "keep",
    overwrite: bool = False,
    progress: Progress | None = None,
    layers_per_stage: list[int] | None = None,
) -> ConvertReport:
    """A transformers ``ViTForImageClassification`` or timm ViT folder -> ``.nemo`` at ``dest``.

    ``source`` is a local folder or fsspec URL holding ``config.json`` and the weights;
    ``source_kind`` overrides detection from ``config.json``. ``layout`` picks NeMo's patch
    embedding: ``conv1`` (NeMo >= 2.0; the patch bias is folded into the position table) or
    ``linear_encoder`` (NeMo 1.23; bias kept). ``layers_per_stage`` splits the layers unevenly
    over the target pipeline stages, as in :func:`ckptcore.api.convert`. Raises ``CkptError``
    for unsupported models, missing files, or config and weights that disagree; nothing is left
    at ``dest`` then.
    """
    start = time.perf_counter()
    dtype = parse_precision(precision)
    check_destination(dest, [source], overwrite)
    with open_community(source, layout, source_kind) as ck:
        if dtype is not None:
            ck.config["megatron_amp_O2"] = dtype != torch.float32
        plan = build_plan(ck, target_tp, target_pp, layers_per_stage, dtype)
        return write_converted(ck, plan, source, dest, overwrite, progress=progress, start=start)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def verify_import(
    folder: str,
    nemo: str,
    layout: str = "conv1",
    source_kind: str | None = None,
    tolerance: float = 1e-5,
    images: int = 1,
    device: str | None = None,
) -> VerifyReport:
    """The community weights in ``folder`` (mapped to NeMo, TP=1) and the ``.nemo`` on the same
    deterministic images: the check of an import's repartitioning and packaging (the mapping
    itself is what ckptcore's community tests hold to transformers and timm)."""
    from ckptcore.model.vit import VitClassificationModel

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with open_community(folder, layout, source_kind) as ck:
        config, sd = load_state_dict(ck)
    source = VitClassificationModel(config, path=folder, weights=sd)
    source.load_state_dict(sd, strict=False)
    output = restore_model(nemo)
    x = sample_images(source.cfg, images).to(dev)
    with torch.inference_mode():
        diff = float((source.to(dev)(x).float() - output.to(dev)(x).float()).abs().max())
    passed = diff <= tolerance
    return VerifyReport(folder, nemo, diff, tolerance, int(x.shape[0]), passed, "logits", dev)


def _check_out_dir(out_dir: str, nemo_source: str, overwrite: bool) -> None:
    if same_location(out_dir, nemo_source):
        raise CkptError(out_dir, "destination is the source; write to another path")
    fs, path = get_fs(out_dir)
    if fs.exists(path):
        if not overwrite:
            raise CkptError(out_dir, "destination already exists (pass overwrite to replace it)")
        if not fs.isdir(path):
            raise CkptError(out_dir, "destination exists and is not a folder")


def _commit_local(tmp: str, final: str) -> None:
    """Move the finished ``tmp`` folder to ``final``, replacing an old one only at the end."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_hf(nemo_source: str, out_dir: str, overwrite: bool = False) -> dict[str, Any]:
    """A NeMo ViT classifier (any TP/PP) -> a transformers ``ViTForImageClassification`` folder.

    Writes ``config.json`` and ``model.safetensors`` under a temporary name, then renames it to
    ``out_dir`` (refused if it exists, unless ``overwrite``). Refuses what HF cannot express:
    ``class_token_length`` != 1, the pretraining head (``finetune: false``), non-square images,
    ``preprocess_layernorm``, ``layerscale``. ``megatron_legacy`` q/k/v rows and the
    ``linear_encoder`` layout convert. With ``conv1`` the patch bias is written as zeros (it lives
    in the position table). Returns a summary dict.
    """
    from ckptcore.nemo_io import load_state_dict

    start = time.perf_counter()
    _check_out_dir(out_dir, nemo_source, overwrite)
    config, state = load_state_dict(nemo_source)
    variant = nemo_variant(with_weights_layout(config, state), nemo_source)
    if variant.position_key in state and variant.position_key.endswith("position_embeddings"):
        state[variant.position_key + ".weight"] = state.pop(variant.position_key)
    g = variant.arch.geometry
    try:
        roles = from_nemo(state, g, variant.layout, variant.legacy)
    except CkptError as exc:
        raise CkptError(nemo_source, exc.problem, exc.key) from None
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in roles.items():
        tensors.update(split_role(hf_fmt.HF_SCHEME, name, tensor))
    dtypes = {t.dtype for t in tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dtypes:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    hf_config = hf_fmt.hf_config(variant.arch, dtype)

    local = is_local(out_dir)
    final = os.path.abspath(local_path(out_dir)) if local else None
    parent = os.path.dirname(final) if final else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = (
        os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
        if final and parent
        else tempfile.mkdtemp(prefix="ckpt-export-")
    )
    try:
        os.makedirs(tmp, exist_ok=True)
        hf_fmt.write_folder(tmp, hf_config, tensors)
        size = sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp))
        if final:
            _commit_local(tmp, final)
        else:
            fs, path = get_fs(out_dir)
            if fs.exists(path) and overwrite:
                fs.rm(path, recursive=True)
            fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    except OSError as exc:
        raise write_error(out_dir, "cannot write", exc) from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    notes = []
    if variant.layout == "conv1":
        notes.append(
            "NeMo conv1 has no patch bias: projection.bias is written as zeros and the bias "
            "stays folded into the position embeddings (same logits)"
        )
    if variant.legacy:
        notes.append("megatron_legacy q/k/v rows [3, heads, head_dim] split into query/key/value")
    return {
        "source": nemo_source,
        "destination": out_dir,
        "layout": variant.layout,
        "megatron_legacy": variant.legacy,
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(tensors),
        "output_bytes": size,
        "config": hf_config,
        "seconds": time.perf_counter() - start,
        "notes": notes,
    }


__all__ = ["detect_kind", "export_hf", "import_hf", "open_community"]
