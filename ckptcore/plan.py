"""Plans: what every target rank file holds and which source bytes make each of its tensors.

``build_plan`` reads only shapes and dtypes (no tensor data) and applies the family's rule table.
A plan is data: frozen records, JSON-serialisable, validated before anything is written. Each
:class:`FilePlan` is an independent work item (one target rank file).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptcore.dtypes import CONFIG_PRECISION, dtype_info, dtype_name
from ckptcore.errors import CkptError
from ckptcore.formats.torchzip import TensorSpec
from ckptcore.layout import RankLayout
from ckptcore.rules import family_for, family_named
from ckptcore.rules.table import Family, Rule, Stage
from ckptcore.sources import Checkpoint, spec_of


@dataclass(frozen=True)
class Piece:
    """A slice of one source tensor: ``[start, start+length)`` along the plan's dim (None = all)."""

    tp_rank: int
    pp_rank: int
    key: str
    start: int | None = None
    length: int | None = None


@dataclass(frozen=True)
class TargetTensor:
    key: str
    dtype: str | None  # None for a None value (``_extra_state``)
    shape: tuple[int, ...] | None
    dim: int | None  # the dim pieces are concatenated along
    pieces: tuple[Piece, ...]
    replicas: tuple[Piece, ...] = ()  # other source copies that must be bitwise equal to pieces[0]

    @property
    def spec(self) -> TensorSpec | None:
        if self.dtype is None or self.shape is None:
            return None
        return TensorSpec(dtype_name(self.dtype), self.shape)

    @property
    def nbytes(self) -> int:
        spec = self.spec
        return 0 if spec is None else spec.nbytes


@dataclass(frozen=True)
class FilePlan:
    tp_rank: int
    pp_rank: int
    path: str  # relative: model_weights.ckpt, mp_rank_00/model_weights.ckpt, ...
    archive_name: str
    tensors: tuple[TargetTensor, ...]
    metadata: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] | None = None

    @property
    def write_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def metadata_dict(self) -> collections.OrderedDict | None:
        if self.metadata is None:
            return None
        return collections.OrderedDict((k, dict(v)) for k, v in self.metadata)


@dataclass(frozen=True)
class Plan:
    family: str
    source_tp: int
    source_pp: int
    target: RankLayout
    config: dict = field(hash=False)
    files: tuple[FilePlan, ...] = ()

    @property
    def model_config(self) -> dict:
        """The config for building the network: :attr:`config` (what is written out, as the
        source wrote it) completed with what only the weights' key names tell."""
        keys = [t.key for fp in self.files for t in fp.tensors]
        return family_named(self.family).model_config(self.config, keys)

    def to_json(self) -> dict:
        out = asdict(self)
        out["target"] = {
            "tp": self.target.tp,
            "pp": self.target.pp,
            "layers_per_stage": list(self.target.layers_per_stage),
        }
        for f, fp in zip(out["files"], self.files, strict=True):
            f["write_bytes"] = fp.write_bytes
            f.pop("metadata", None)
        return out

    def digest(self) -> str:
        return hashlib.sha256(
            json.dumps(self.to_json(), sort_keys=True, default=str).encode()
        ).hexdigest()


@dataclass
class _Global:
    """One tensor of the whole (unpartitioned) model, and where its shards are in the source."""

    key: str
    rule: Rule
    layer: int | None
    stage: int  # source pp rank holding it
    local_key: str
    spec: TensorSpec | None  # full (TP=1) spec
    shard_spec: TensorSpec | None
    copies: list[tuple[int, str]] = field(default_factory=list)  # other (pp_rank, local_key)


def _source_layers(ck: Checkpoint, fam: Family) -> list[int]:
    """Layer count of each source pipeline stage (local numbers must run 0..n-1)."""
    counts = []
    for p in range(ck.pp):
        layers = sorted({parts[1] for k in ck.ranks[(0, p)].state if (parts := fam.split_layer(k))})
        if layers != list(range(len(layers))):
            raise CkptError(
                ck.ranks[(0, p)].name, f"layer numbers {layers} do not run 0..{len(layers) - 1}"
            )
        counts.append(len(layers))
    return counts


def _collect(ck: Checkpoint, fam: Family) -> list[_Global]:
    counts = _source_layers(ck, fam)
    seen: dict[str, _Global] = {}
    unknown: list[str] = []
    for p in range(ck.pp):
        lead = ck.ranks[(0, p)]
        keys = list(lead.state)
        for t in range(1, ck.tp):
            other = ck.ranks[(t, p)]
            if list(other.state) != keys:
                missing = sorted(set(keys) - set(other.state))
                extra = sorted(set(other.state) - set(keys))
                detail = (
                    f"missing {missing[:5]}"
                    if missing
                    else f"unexpected {extra[:5]}"
                    if extra
                    else "keys in a different order"
                )
                raise CkptError(other.name, f"keys differ from {lead.name}: {detail}")
        offset = sum(counts[:p])
        for key in keys:
            parts = fam.split_layer(key)
            layer = None if parts is None else offset + parts[1]
            gkey = key if layer is None else fam.with_layer(key, layer)
            rule = fam.rule_for(gkey)
            if rule is None:
                unknown.append(gkey)
                continue
            if gkey in seen:
                seen[gkey].copies.append((p, key))
                continue
            shard, full = _shard_specs(ck, fam, p, key, rule)
            seen[gkey] = _Global(gkey, rule, layer, p, key, full, shard)
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise CkptError(
            ck.url, f"keys the {fam.name} rule table does not know: {', '.join(unknown[:8])}{more}"
        )
    return list(seen.values())


def _shard_specs(
    ck: Checkpoint, fam: Family, p: int, key: str, rule: Rule
) -> tuple[TensorSpec | None, TensorSpec | None]:
    specs = [spec_of(ck.ranks[(t, p)].state[key]) for t in range(ck.tp)]
    first = specs[0]
    for t, spec in enumerate(specs[1:], start=1):
        if spec != first:
            raise CkptError(
                ck.ranks[(t, p)].name,
                f"shape/dtype {_fmt(spec)} differs from tp rank 0's {_fmt(first)}",
                key,
            )
    if first is None or rule.split_dim is None:
        return first, first
    d = rule.split_dim
    if d >= len(first.shape):
        raise CkptError(
            ck.ranks[(0, p)].name, f"has {len(first.shape)} dims, rule splits dim {d}", key
        )
    full = list(first.shape)
    full[d] *= ck.tp
    return first, TensorSpec(first.dtype, tuple(full))


def _fmt(spec: TensorSpec | None) -> str:
    return "None" if spec is None else f"{tuple(spec.shape)} {dtype_info(spec.dtype).name}"


def check_shapes(entries: list[_Global], fam: Family, config: dict, path: str) -> None:
    """Full tensor shapes must be what the config implies; raises naming the first mismatch."""
    if fam.expected_shapes is None:
        return
    expected = fam.expected_shapes(config)
    have = {e.key: e for e in entries}
    missing = [k for k, shape in expected.items() if shape is not None and k not in have]
    if missing:
        raise CkptError(
            path, f"weights lack {len(missing)} tensor(s) the config implies, e.g. {missing[0]}"
        )
    for e in entries:
        if e.key not in expected:
            raise CkptError(
                path, "tensor not expected for this config (config and weights disagree)", e.key
            )
        want = expected[e.key]
        if want is None:
            if e.spec is not None:
                raise CkptError(path, f"expected None, found a tensor {_fmt(e.spec)}", e.key)
            continue
        if e.spec is None or tuple(e.spec.shape) != tuple(want):
            got = "None" if e.spec is None else str(tuple(e.spec.shape))
            raise CkptError(
                path, f"full shape {got} does not match {tuple(want)} implied by the config", e.key
            )


def split_ranges(
    full: int, groups: int, src_tp: int, dst_tp: int, dst_rank: int
) -> list[tuple[int, int, int]]:
    """Which source shards make target shard ``dst_rank``: [(src_rank, src_start, length)].

    The full tensor is ``groups`` equal blocks along the split dim; rank r of n holds chunk r of
    every block, blocks in order. ``groups=1`` is Megatron's plain column/row split.
    """
    block = full // groups
    src_chunk, dst_chunk = block // src_tp, block // dst_tp
    out: list[tuple[int, int, int]] = []
    for b in range(groups):
        lo, hi = dst_rank * dst_chunk, (dst_rank + 1) * dst_chunk  # within the block
        s = lo // src_chunk
        while lo < hi:
            s_lo = s * src_chunk
            take = min(hi, s_lo + src_chunk) - lo
            start = b * src_chunk + (lo - s_lo)
            if out and out[-1][0] == s and out[-1][1] + out[-1][2] == start:
                out[-1] = (s, out[-1][1], out[-1][2] + take)
            else:
                out.append((s, start, take))
            lo += take
            s += 1
    return out


def _target_metadata(
    ck: Checkpoint,
    fam: Family,
    counts: list[int],
    layout: RankLayout,
    pp_rank: int,
    keys: list[str],
):
    rx = re.compile(f"^({fam.layer_prefix})(\\d+)(\\..*)?$")
    merged: dict[str, tuple[dict, set[int]]] = {}
    for p in range(ck.pp):
        meta = ck.ranks[(0, p)].metadata
        if not meta:
            continue
        offset = sum(counts[:p])
        for prefix, value in meta.items():
            m = rx.match(prefix)
            gprefix = (
                prefix if not m else f"{m.group(1)}{offset + int(m.group(2))}{m.group(3) or ''}"
            )
            entry = merged.setdefault(
                gprefix, (dict(value) if isinstance(value, dict) else {}, set())
            )
            entry[1].add(p)
    if not merged:
        return None
    lo = layout.stage_start(pp_rank)
    hi = lo + layout.layers_per_stage[pp_rank]
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    out = []
    for gprefix, (value, stages) in merged.items():
        m = rx.match(gprefix)
        if m:
            layer = int(m.group(2))
            if not lo <= layer < hi:
                continue
            name = f"{m.group(1)}{layer - lo}{m.group(3) or ''}"
        else:
            name = gprefix
            owns = [k for k in keys if gprefix == "" or k.startswith(gprefix + ".")]
            anywhere = any(k.startswith(gprefix + ".") for k in _all_keys(ck)) if gprefix else True
            if anywhere and not owns:
                continue
            if not anywhere:
                src_first, src_last = 0 in stages, ck.pp - 1 in stages
                middle = any(0 < s < ck.pp - 1 for s in stages)
                if not (
                    (first and src_first)
                    or (last and src_last)
                    or (not first and not last and middle)
                    or len(stages) == ck.pp
                ):
                    continue
        out.append((name, tuple(sorted(value.items()))))
    return tuple(out)


def _all_keys(ck: Checkpoint) -> list[str]:
    return [k for p in range(ck.pp) for k in ck.ranks[(0, p)].state]


def build_plan(
    ck: Checkpoint,
    target_tp: int | None = None,
    target_pp: int | None = None,
    layers_per_stage: list[int] | None = None,
    dtype: Any = None,
    check_replicas: bool = True,
) -> Plan:
    """Plan the repartition of ``ck`` to ``target_tp`` x ``target_pp`` (None keeps the source's).

    A target that does not fit the model is a ``CkptError`` naming the source (whose sizes it
    does not divide).
    """
    try:
        return _build_plan(ck, target_tp, target_pp, layers_per_stage, dtype, check_replicas)
    except CkptError as exc:
        if exc.path is not None:
            raise
        raise CkptError(ck.url, exc.problem, exc.key) from None


def _config_int(ck: Checkpoint, key: str) -> int | None:
    value = ck.config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CkptError(ck.url, f"expected an integer, got {value!r:.40}", key)
    try:
        return int(value)
    except ValueError:
        raise CkptError(ck.url, f"expected an integer, got {value!r:.40}", key) from None


def _build_plan(
    ck: Checkpoint,
    target_tp: int | None,
    target_pp: int | None,
    layers_per_stage: list[int] | None,
    dtype: Any,
    check_replicas: bool,
) -> Plan:
    fam = family_for(ck.config, _all_keys(ck), ck.url)
    entries = _collect(ck, fam)
    counts = _source_layers(ck, fam)
    num_layers = sum(counts)
    cfg_layers = _config_int(ck, fam.num_layers_key)
    if cfg_layers is not None and cfg_layers != num_layers:
        raise CkptError(
            ck.url,
            f"config says {fam.num_layers_key}={cfg_layers} but the weights hold {num_layers} layers",
        )
    check_shapes(entries, fam, fam.model_config(ck.config, [e.key for e in entries]), ck.url)
    tp = ck.tp if target_tp is None else int(target_tp)
    pp = ck.pp if target_pp is None else int(target_pp)
    if layers_per_stage:
        if target_pp is not None and len(layers_per_stage) != pp:
            raise CkptError(
                None, f"--layers-per-stage has {len(layers_per_stage)} stages, --target-pp is {pp}"
            )
        layout = RankLayout.explicit(tp, list(layers_per_stage), num_layers)
    elif pp == ck.pp and target_pp is None and ck.pp > 1:
        layout = RankLayout(tp, pp, tuple(counts))
    else:
        layout = RankLayout.even(tp, pp, num_layers)
    if fam.check_target is not None:
        fam.check_target(ck.config, tp, pp)
    for e in entries:
        if e.spec is not None and e.rule.split_dim is not None:
            g = e.rule.groups_for(ck.config)
            size = e.spec.shape[e.rule.split_dim]
            if size % (g * tp) or size % (g * ck.tp):
                raise CkptError(
                    None,
                    f"target TP={tp} does not divide dim {e.rule.split_dim} ({size}) into {g} group(s)",
                    e.key,
                )

    files = []
    for p_t in range(layout.pp):
        lo = layout.stage_start(p_t)
        hi = lo + layout.layers_per_stage[p_t]
        stage_entries = [
            e
            for e in entries
            if (e.rule.stage is Stage.FIRST and p_t == 0)
            or (e.rule.stage is Stage.LAST and p_t == layout.pp - 1)
            or (e.rule.stage is Stage.LAYER and e.layer is not None and lo <= e.layer < hi)
        ]
        keys = [
            e.key if e.layer is None else fam.with_layer(e.key, e.layer - lo) for e in stage_entries
        ]
        metadata = _target_metadata(ck, fam, counts, layout, p_t, keys)
        for t in range(layout.tp):
            tensors = tuple(
                _target_tensor(ck, e, key, t, layout.tp, dtype, check_replicas and t == 0)
                for e, key in zip(stage_entries, keys, strict=True)
            )
            files.append(
                FilePlan(
                    t,
                    p_t,
                    layout.weights_path(t, p_t),
                    layout.archive_name(t, p_t),
                    tensors,
                    metadata,
                )
            )
    config = dict(ck.config)
    config["tensor_model_parallel_size"] = layout.tp
    config["pipeline_model_parallel_size"] = layout.pp
    if dtype is not None and dtype_name(dtype) in CONFIG_PRECISION:
        config["precision"] = CONFIG_PRECISION[dtype_name(dtype)]
    if not config.get("target") and fam.default_target:
        config["target"] = fam.default_target
    plan = Plan(fam.name, ck.tp, ck.pp, layout, config, tuple(files))
    validate_plan(plan, ck)
    return plan


def _target_tensor(
    ck: Checkpoint, e: _Global, key: str, t: int, tp: int, dtype, with_replicas: bool
) -> TargetTensor:
    if e.spec is None:
        return TargetTensor(key, None, None, None, ())
    out_dtype = e.spec.dtype
    if dtype is not None and out_dtype.is_floating_point:
        out_dtype = dtype
    d = e.rule.split_dim
    if d is None:
        pieces = (Piece(0, e.stage, e.local_key),)
        shape = e.spec.shape
        replicas: tuple[Piece, ...] = ()
        if with_replicas:
            replicas = tuple(Piece(s, e.stage, e.local_key) for s in range(1, ck.tp)) + tuple(
                Piece(s, p, k) for p, k in e.copies for s in range(ck.tp)
            )
    else:
        g = e.rule.groups_for(ck.config)
        ranges = split_ranges(e.spec.shape[d], g, ck.tp, tp, t)
        whole = e.shard_spec.shape[d] if e.shard_spec else None
        pieces = tuple(
            Piece(
                s,
                e.stage,
                e.local_key,
                None if (start == 0 and n == whole) else start,
                None if (start == 0 and n == whole) else n,
            )
            for s, start, n in ranges
        )
        shape = list(e.spec.shape)
        shape[d] //= tp
        shape = tuple(shape)
        replicas = ()
    return TargetTensor(key, dtype_info(out_dtype).name, tuple(shape), d, pieces, replicas)


def validate_plan(plan: Plan, ck: Checkpoint) -> None:
    """Every target tensor is exactly covered by in-bounds source slices, and across all target
    files every split source shard is read exactly once along its split dim: no overlap, no gap.
    """
    _check_slices(plan, ck)
    _check_tiling(plan, ck)


def _check_tiling(plan: Plan, ck: Checkpoint) -> None:
    """The slices read along a dim from each source shard tile it: none read twice, none left."""
    spans: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
    dims: dict[tuple[int, int, str], int] = {}
    for fp in plan.files:
        for tt in fp.tensors:
            if tt.spec is None or tt.dim is None:
                continue
            for pc in tt.pieces:
                size = ck.ranks[(pc.tp_rank, pc.pp_rank)].state[pc.key].shape[tt.dim]
                start = 0 if pc.start is None else pc.start
                length = size if pc.length is None else pc.length
                spans.setdefault((pc.tp_rank, pc.pp_rank, pc.key), []).append(
                    (start, start + length)
                )
                dims[(pc.tp_rank, pc.pp_rank, pc.key)] = tt.dim
    stages = {(p, key) for _, p, key in spans}
    for p, key in sorted(stages):
        for t in range(ck.tp):
            if (t, p, key) not in spans:
                raise CkptError(ck.url, f"plan never reads tp rank {t}'s shard", key)
    for (t, p, key), found in sorted(spans.items()):
        size = ck.ranks[(t, p)].state[key].shape
        dim = dims[(t, p, key)]
        end = 0
        for lo, hi in sorted(found):
            if lo < end:
                raise CkptError(
                    ck.url,
                    f"plan reads rows {lo}..{min(hi, end)} of tp rank {t}'s shard twice",
                    key,
                )
            if lo > end:
                raise CkptError(
                    ck.url, f"plan never reads rows {end}..{lo} of tp rank {t}'s shard", key
                )
            end = hi
        if end != size[dim]:
            raise CkptError(
                ck.url, f"plan never reads rows {end}..{size[dim]} of tp rank {t}'s shard", key
            )


def _check_slices(plan: Plan, ck: Checkpoint) -> None:
    """Every target tensor is covered by in-bounds source slices of the right total length."""
    for fp in plan.files:
        for tt in fp.tensors:
            if tt.spec is None:
                continue
            total = 0
            for pc in tt.pieces:
                src = ck.ranks[(pc.tp_rank, pc.pp_rank)].state.get(pc.key)
                if src is None:
                    raise CkptError(ck.url, f"plan reads a missing source tensor {pc.key}", tt.key)
                if tt.dim is None:
                    if tuple(src.shape) != tt.shape:
                        raise CkptError(
                            ck.url, f"plan copies {tuple(src.shape)} into {tt.shape}", tt.key
                        )
                    total = tt.shape[0] if tt.shape else 1
                    continue
                size = src.shape[tt.dim]
                start = 0 if pc.start is None else pc.start
                length = size if pc.length is None else pc.length
                if start < 0 or length <= 0 or start + length > size:
                    raise CkptError(
                        ck.url, f"plan slice {start}+{length} out of bounds {size}", tt.key
                    )
                total += length
            want = tt.shape[tt.dim] if tt.dim is not None else (tt.shape[0] if tt.shape else 1)
            if total != want:
                raise CkptError(
                    ck.url, f"plan covers {total} of {want} rows along dim {tt.dim}", tt.key
                )
