"""ckptcore's surface: the operations the ``ckpt`` command and the Prefect tasks call.

Each function takes URLs or paths, raises :class:`~ckptcore.errors.CkptError` for bad input, and
leaves nothing at the destination unless it succeeds. Besides the whole operations (``convert``,
``verify``, ``inspect``, ...), the pipeline's steps are here by name, so the tasks need no other
module of ckptcore (besides the records in ``lineage``, ``errors`` and ``settings``):

- list and open: ``describe_source``, ``locate_checkpoint``, ``fetch_checkpoint``,
  ``check_unchanged`` (:mod:`ckptcore.listing`), ``find_checkpoint``, ``scan_folder``,
  ``parse_rank_folder``, ``open_checkpoint``
- plan: ``plan_conversion``, ``work_items``, ``estimate``
- write: ``write_rank_files``, ``nemo_members``, ``write_work_item``, ``member_at``,
  ``package_nemo``, ``write_nemo_file``, ``FollowingDigest``
- assemble in place (:mod:`ckptcore.assembly`): ``headers_only`` (plan without reading
  records' places), ``plan_sizes``, ``assembly_for``, ``begin_archive``, ``write_piece``,
  ``write_tail``, ``commit_archive``, ``abort_archive``, ``rank_member``, ``composite_crc32``
- verify: ``verify``, ``same_weights``, ``sample_images`` (``verify_process`` runs it ahead of
  time in a child process)
- publish: ``put_file``, ``put_bytes``, ``FollowingUpload``, ``check_destination``, ``lock_file``,
  ``abort_incomplete_uploads``
- storage URLs: ``get_fs``, ``join``, ``is_local``, ``local_path``, ``is_s3``, ``etag_of``,
  ``forget_listings``
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

from ckptcore.assembly import (
    ArchiveTarget,
    Assembly,
    Piece,
    PieceResult,
    Tail,
    abort_archive,
    assembly_for,
    begin_archive,
    commit_archive,
    plan_sizes,
    rank_member,
    write_piece,
    write_tail,
)
from ckptcore.dtypes import dtype_info, parse_precision
from ckptcore.engine import iter_file, tensor_bits
from ckptcore.errors import CkptError, write_error
from ckptcore.follow import FollowingDigest
from ckptcore.formats import nemo as nemo_fmt
from ckptcore.formats.nemo import (
    CONFIG_NAME,
    MemberData,
    MemberSource,
    archive_layout,
    dump_config,
)
from ckptcore.formats.ptl import find_checkpoint, scan_folder
from ckptcore.layout import parse_rank_folder
from ckptcore.lineage import Layout
from ckptcore.listing import (
    FetchedCheckpoint,
    ListedFile,
    SourceListing,
    cache_location,
    changed_since_listed,
    check_unchanged,
    default_destination,
    describe_source,
    fetch_checkpoint,
    fetch_location,
    fetched_is_present,
    locate_checkpoint,
    split_checkpoint_url,
)
from ckptcore.model.config import vit_dims, vit_options
from ckptcore.multipart import FollowingUpload, composite_crc32, is_s3, part_size_for
from ckptcore.nemo_io import (
    Progress,
    load_state_dict,
    member_at,
    nemo_members,
    package_nemo,
    write_nemo_file,
    write_rank_files,
)
from ckptcore.output import (
    abort_incomplete_uploads,
    check_destination,
    lock_file,
    process_alive,
    process_folder,
    put_bytes,
    put_file,
    staging_folder,
)
from ckptcore.plan import FilePlan, Plan, build_plan
from ckptcore.sources import Checkpoint, headers_only, open_checkpoint
from ckptcore.storage import (
    RangeCache,
    etag_of,
    forget_listings,
    get_fs,
    is_local,
    join,
    local_path,
)
from ckptcore.workplan import (
    WorkItem,
    estimate,
    work_items,
    write_work_item,
)

__all__ = [
    # whole operations
    "ConvertReport", "VerifyReport", "convert", "describe_dtype", "inspect", "plan_conversion",
    "restore_model", "same_weights", "sample_images", "save_model", "verify", "write_converted",
    # the pipeline's steps (the module docstring lists them by step)
    "abort_archive", "abort_incomplete_uploads", "ArchiveTarget", "archive_layout", "Assembly",
    "assembly_for", "begin_archive", "commit_archive", "composite_crc32", "Piece", "PieceResult",
    "headers_only", "plan_sizes", "rank_member", "Tail", "write_piece", "write_tail", "cache_location", "changed_since_listed",
    "check_destination", "check_unchanged", "Checkpoint", "CONFIG_NAME", "default_destination",
    "describe_source", "dump_config", "estimate", "etag_of", "fetch_checkpoint", "fetch_location",
    "fetched_is_present", "FetchedCheckpoint", "FilePlan", "find_checkpoint", "FollowingDigest",
    "FollowingUpload", "forget_listings", "get_fs", "is_local", "is_s3", "join", "ListedFile",
    "load_state_dict", "local_path", "locate_checkpoint", "lock_file", "member_at", "MemberData",
    "MemberSource", "nemo_members", "open_checkpoint", "package_nemo", "parse_rank_folder",
    "part_size_for", "Plan", "process_alive", "process_folder", "Progress", "put_bytes", "put_file",
    "RangeCache", "scan_folder", "SourceListing", "split_checkpoint_url", "staging_folder",
    "work_items", "WorkItem", "write_nemo_file", "write_rank_files", "write_work_item",
]  # fmt: skip


@dataclass
class ConvertReport:
    """What ``ckpt convert`` / ``reshard`` / ``import-hf`` did: the layout facts (one
    :class:`~ckptcore.lineage.Layout`), where, how many bytes, how long."""

    source: str
    destination: str
    source_kind: str
    checkpoint_name: str | None
    layout: Layout
    tensor_bytes: int
    output_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON (``ckpt ... --json``): the layout's fields beside the others."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}
        return {**out, **self.layout.to_dict()}


def plan_conversion(
    ck: Checkpoint,
    target_tp: int | None = None,
    target_pp: int | None = None,
    precision: str | int | None = "keep",
    layers_per_stage: list[int] | None = None,
) -> Plan:
    return build_plan(ck, target_tp, target_pp, layers_per_stage, parse_precision(precision))


def convert(
    source: str,
    dest: str,
    checkpoint: str = "last",
    target_tp: int | None = None,
    target_pp: int | None = None,
    precision: str | int | None = "keep",
    layers_per_stage: list[int] | None = None,
    overwrite: bool = False,
    workers: int = 1,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    extra_members: dict[str, bytes] | None = None,
) -> ConvertReport:
    """Any supported checkpoint -> a ``.nemo`` at ``dest``, repartitioned to the target TP/PP."""
    start = time.perf_counter()
    check_destination(dest, [source], overwrite)
    with open_checkpoint(source, checkpoint) as ck:
        plan = plan_conversion(ck, target_tp, target_pp, precision, layers_per_stage)
        return write_converted(
            ck,
            plan,
            source,
            dest,
            overwrite,
            workers,
            allow_nonfinite,
            progress,
            extra_members,
            start,
        )


def write_converted(
    ck: Checkpoint,
    plan: Plan,
    source: str,
    dest: str,
    overwrite: bool = False,
    workers: int = 1,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    extra_members: dict[str, bytes] | None = None,
    start: float | None = None,
) -> ConvertReport:
    """Execute ``plan`` over ``ck`` into the ``.nemo`` at ``dest``; the report of it.

    With one worker the rank files stream straight into the archive (each byte written once);
    with more, they are written in parallel to a staging folder and then packed.
    """
    start = time.perf_counter() if start is None else start
    with staging_folder() as stage:
        if workers > 1 and len(plan.files) > 1:
            try:
                staged = write_rank_files(ck, plan, stage, workers, allow_nonfinite, progress)
            except OSError as exc:
                raise write_error(dest, f"cannot write the staging folder {stage}", exc) from None
            files: dict[str, nemo_fmt.MemberData] = dict(staged)
        else:
            files = nemo_members(ck, plan, allow_nonfinite, progress)
        files.update(extra_members or {})
        size = package_nemo(files, dest, [source], overwrite)
    return ConvertReport(
        source=source,
        destination=dest,
        source_kind=ck.kind,
        checkpoint_name=ck.name,
        layout=Layout.of(ck, plan),
        tensor_bytes=sum(f.write_bytes for f in plan.files),
        output_bytes=size,
        seconds=time.perf_counter() - start,
    )


def restore_model(
    path: str,
    map_location: Any = None,
    checkpoint: str = "last",
    cache: RangeCache | str | None = None,
):
    """The reference model restored from any checkpoint (see ``VitClassificationModel.restore_from``)."""
    from ckptcore.model.vit import VitClassificationModel

    return VitClassificationModel.restore_from(path, map_location, checkpoint, cache=cache)


def save_model(model, save_path: str, tp: int = 1, pp: int = 1, overwrite: bool = True) -> str:
    """``model.save_to(save_path, tp, pp, overwrite)``."""
    return model.save_to(save_path, tp, pp, overwrite)


def inspect(path: str, checkpoint: str = "last") -> dict[str, Any]:
    """What a checkpoint is: format, layout, TP/PP, parameters, dtypes, sizes, step, config."""
    with open_checkpoint(path, checkpoint) as ck:
        plan = build_plan(ck)
        params = 0
        dtypes: dict[str, int] = {}
        full = build_plan(ck, 1, 1).files[0]
        for tt in full.tensors:
            if tt.spec is None:
                continue
            n = 1
            for s in tt.shape or ():
                n *= s
            params += n
            dtypes[tt.dtype] = dtypes.get(tt.dtype, 0) + n
        cfg = ck.config
        summary_keys = (
            "target", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "patch_dim",
            "img_h", "img_w", "num_channels", "num_classes", "class_token_length", "finetune", "precision",
            "megatron_amp_O2", "megatron_legacy",
        )  # fmt: skip
        layout = (
            "single file"
            if ck.tp == 1 and ck.pp == 1
            else ("mp_rank_XX" if ck.pp == 1 else "tp_rank_XX_pp_rank_YYY")
        )
        return {
            "path": path,
            "format": {
                "nemo": ".nemo archive",
                "nemo-dir": "extracted .nemo folder",
                "ptl": "Lightning training checkpoint",
            }.get(ck.kind, ck.kind),
            "family": plan.family,
            "checkpoint": ck.name,
            "layout": layout,
            "tp": ck.tp,
            "pp": ck.pp,
            "layers_per_stage": list(plan.target.layers_per_stage),
            "parameters": params,
            "dtypes": dtypes,
            "tensor_bytes": full.write_bytes,
            "files": [{"path": u, "bytes": s} for u, s in ck.files],
            "step": ck.step,
            "epoch": ck.epoch,
            "config": {k: cfg[k] for k in summary_keys if k in cfg},
            "notes": ck.notes,
        }


@dataclass
class VerifyReport:
    """``method``: ``"logits"`` (both models ran on the images and their logits were compared)
    or ``"same-weights"`` (every tensor of ``a`` equals ``b``'s bit for bit and both configs
    build the same network, so their logits are equal by construction: ``b`` ran on the images,
    ``max_abs_diff`` is 0). ``device``: where the models ran."""

    a: str
    b: str
    max_abs_diff: float
    tolerance: float
    images: int
    passed: bool
    method: str = "logits"
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_images(config: dict, count: int = 4, seed: int = 0) -> Any:
    """Deterministic images for comparisons: ``randn`` from a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = int(config.get("num_channels", 3))
    return torch.randn(count, c, int(config["img_h"]), int(config["img_w"]), generator=g)


def same_weights(a: str, model: Any, cache: RangeCache | str | None = None) -> bool:
    """Whether the checkpoint ``a``, merged to TP=1/PP=1, holds exactly ``model``'s tensors
    (same names, dtypes, shapes and bits) and its config builds the same network.

    One tensor of ``a`` in memory at a time. False on any difference, including a config the
    reference model does not accept (the caller's full comparison then reports it)."""
    import torch

    ck = open_checkpoint(a, "last", cache)
    try:
        plan = build_plan(ck, 1, 1)
        try:
            built = plan.model_config
            if (vit_dims(built), vit_options(built)) != (model.dims, model.opts):
                return False
        except CkptError:
            return False
        ours = {k: v for k, v in model.state_dict().items() if v is not None}
        seen = 0
        for key, value in iter_file(ck, plan.files[0]):
            if value is None:
                if key in ours:
                    return False
                continue
            t = ours.get(key)
            if t is None or t.dtype != value.dtype or t.shape != value.shape:
                return False
            if not torch.equal(tensor_bits(t), tensor_bits(value)):
                return False
            seen += 1
        return seen == len(ours)
    finally:
        ck.close()


def verify(
    a: str,
    b: str,
    tolerance: float = 1e-5,
    images: int = 4,
    device: str | None = None,
    cache: RangeCache | str | None = None,
    run_both: bool = False,
) -> VerifyReport:
    """Run both checkpoints on the same deterministic images; compare logits.

    ``b`` is restored in the reference model and run on the images. Where ``a`` holds the very
    same tensors, bit for bit, for the same network (a repartition or any lossless conversion),
    running ``a`` too could only give the same numbers, so it is compared tensor by tensor
    instead (``method="same-weights"``); otherwise ``a`` is restored and run as well
    (``method="logits"``, e.g. after a precision change; always with ``run_both``). One model
    in memory at a time.

    ``cache``: a range cache that already holds what a conversion read of a remote ``a`` (or
    ``b``), so verifying does not fetch those bytes again."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mb = restore_model(b, cache=cache)
    dims, x = mb.dims, sample_images(mb.cfg, images).to(dev)
    if dev == "cpu" and not run_both:
        # b's forward pass (torch's threads) runs while its tensors are compared with a's
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt-verify") as pool:
            forward = pool.submit(_logits, mb, x)
            try:
                identical = same_weights(a, mb, cache)
            finally:
                lb = forward.result()
    else:  # compared on the CPU, before the model moves to the device
        identical = not run_both and same_weights(a, mb, cache)
        lb = _logits(mb.to(dev), x)
    del mb
    if identical:
        ok = bool(torch.isfinite(lb).all())
        return VerifyReport(a, b, 0.0, tolerance, images, ok, "same-weights", dev)
    ma = restore_model(a, cache=cache).to(dev)
    if ma.dims != dims:
        raise CkptError(b, f"model shape differs from {a}: {dims} vs {ma.dims}")
    la = _logits(ma, x)
    del ma
    diff = float((la - lb).abs().max())
    ok = diff <= tolerance and bool(torch.isfinite(la).all()) and bool(torch.isfinite(lb).all())
    return VerifyReport(a, b, diff, tolerance, images, ok, "logits", dev)


def _logits(model: Any, x: Any) -> Any:
    """``model(x)`` as float32, without autograd (entered here: the mode is per thread)."""
    import torch

    with torch.inference_mode():
        return model(x).float()


def describe_dtype(dtype: Any) -> str:
    return dtype_info(dtype).name
