"""Lineage of a converted checkpoint: what went in, what came out, how, with what code.

A :class:`LineageRecord` is plain data. It is written as JSON in three places: the
``lineage.json`` member of the ``.nemo``, the sidecar ``<destination>.lineage.json`` beside it,
and (as a short summary) the object metadata of the ``.nemo`` in S3. An archive cannot hold its
own digest, so the member is written before packaging, with ``output`` and ``verify`` still
empty; the sidecar is the complete record and is written last, so it also marks the upload as
committed.

This module knows nothing of Prefect: the run identity is handed in as a :class:`RunInfo`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata as importlib_metadata
from typing import Any

from ckptcore.errors import CkptError
from ckptcore.formats.nemo import TRAILER
from ckptcore.layout import parse_rank_folder

SCHEMA = "ckpt-pipeline/lineage/v1"
MEMBER_NAME = TRAILER  # the archive's last member
SIDECAR_SUFFIX = ".lineage.json"
PROJECT = "ckpt-pipeline"
_CHUNK_BYTES = 8 << 20
_METADATA_VALUE_CHARS = 256  # S3 user metadata is 2 KB in all: keep each value short


def sidecar_url(destination: str) -> str:
    """Where the complete lineage record of ``destination`` lives."""
    return destination + SIDECAR_SUFFIX


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, read in 8 MiB chunks into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class Layout:
    """What a conversion's plan says of its result: the one record of these facts. Lineage
    records, ``ckpt`` reports and partition manifests all take them from here."""

    source_tp: int
    source_pp: int
    target_tp: int
    target_pp: int
    precision: str
    plan_digest: str
    step: int | None = None
    epoch: int | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, ck: Any, plan: Any, notes: tuple[str, ...] | None = None) -> Layout:
        """The facts of ``plan`` (a :class:`ckptcore.plan.Plan`) over the open checkpoint ``ck``."""
        return cls(
            source_tp=ck.tp,
            source_pp=ck.pp,
            target_tp=plan.target.tp,
            target_pp=plan.target.pp,
            precision=str(plan.config.get("precision")),
            plan_digest=plan.digest(),
            step=ck.step,
            epoch=ck.epoch,
            notes=tuple(ck.notes) if notes is None else tuple(notes),
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready fields (``notes`` a list)."""
        return {**asdict(self), "notes": list(self.notes)}

    def record_fields(self) -> dict[str, Any]:
        """The fields a :class:`LineageRecord` keeps flat under the same names (its notes
        gather more than the plan's)."""
        return {k: v for k, v in asdict(self).items() if k != "notes"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """The layout among ``data``'s keys (a manifest or report holds more)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["notes"] = tuple(values.get("notes") or ())
        return cls(**values)


@dataclass(frozen=True)
class SourceFile:
    """One file of the source checkpoint: its URL, size and content identity.

    A local file (or a downloaded object) has its sha256. An object read in place from object
    storage has its ETag instead: hashing it would mean reading every byte of it, optimizer
    state included, which a conversion does not need.
    """

    url: str
    size_bytes: int
    sha256: str | None = None
    etag: str | None = None

    @property
    def identity(self) -> str:
        """What says the content: the ETag of an object, else the sha256."""
        return f"etag:{self.etag}" if self.etag else f"sha256:{self.sha256 or ''}"


def files_digest(files: list[SourceFile]) -> str:
    """One digest for a set of files: sha256 over their sorted (name, size, identity) lines.

    Only the file name and its rank folder (``mp_rank_01/``) take part, so the same checkpoint
    copied to another prefix has the same digest (for objects: as long as the copy keeps the
    ETag, as a server-side copy of a single-part object does). An object's identity is its
    ETag whether or not it was also downloaded and hashed, so a run that reads a source in place
    and one that downloads it agree on the digest.
    """
    lines = sorted(f"{_rank_relative(f.url)}\t{f.size_bytes}\t{f.identity}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _rank_relative(url: str) -> str:
    parts = url.rstrip("/").split("/")
    if len(parts) >= 2 and parse_rank_folder(parts[-2]) is not None:
        return "/".join(parts[-2:])
    return parts[-1]


@dataclass(frozen=True)
class OutputInfo:
    """The ``.nemo`` that was produced."""

    url: str
    size_bytes: int
    sha256: str | None  # None: assembled in the store, never whole on one machine
    checksum: str | None = None  # then S3's composite CRC-32 of its parts: "<base64>-<parts>"


VERIFY_METHODS = {  # VerifyInfo.method (its "+"-joined parts) -> what ran, in words
    "logits": "both models run",
    "same-weights": "tensors bit-identical, output model run",
    "items": "every rank file read back where it was written, each tensor bit-identical to its "
    "source slice",
}


def describe_method(method: str) -> str:
    """A verify method in words (``items+same-weights``: both parts)."""
    return "; ".join(VERIFY_METHODS.get(part, part) for part in method.split("+"))


@dataclass(frozen=True)
class VerifyInfo:
    """Source and output models on the same deterministic images."""

    max_abs_diff: float
    tolerance: float
    images: int
    passed: bool
    device: str
    method: str = "logits"  # or "same-weights" (ckptcore.api.VerifyReport); "items", "items+..."
    items: int = 0  # rank files checked where they were written (method "items...")
    tensors: int = 0  # their tensors compared


@dataclass(frozen=True)
class RunInfo:
    """Who made the record: the orchestrator's run identity (empty when run without one)."""

    flow_name: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    deployment_name: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LineageRecord:
    """Everything needed to say where a ``.nemo`` came from and to reproduce it."""

    source: str
    checkpoint: str | None
    source_files: list[SourceFile]
    source_digest: str
    step: int | None
    epoch: int | None
    source_tp: int
    source_pp: int
    target_tp: int
    target_pp: int
    precision: str
    plan_digest: str
    destination: str
    run: RunInfo = field(default_factory=RunInfo)
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the worker's, as the run read them
    timings: dict[str, float] = field(default_factory=dict)
    output: OutputInfo | None = None
    verify: VerifyInfo | None = None
    notes: list[str] = field(default_factory=list)
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    )
    schema: str = SCHEMA

    # ------------------------------------------------------------------ building
    def with_timing(self, step: str, seconds: float) -> LineageRecord:
        return replace(self, timings={**self.timings, step: round(float(seconds), 3)})

    def with_output(self, output: OutputInfo) -> LineageRecord:
        return replace(self, output=output)

    def completed(
        self, output: OutputInfo | None, verify: VerifyInfo | None, timings: dict[str, float]
    ) -> LineageRecord:
        """The record once the ``.nemo`` exists (and was verified, if it was)."""
        merged = {**self.timings, **{k: round(float(v), 3) for k, v in timings.items()}}
        return replace(self, output=output, verify=verify, timings=merged)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> LineageRecord:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise CkptError(path, f"not a lineage record (schema {got!r}, expected {SCHEMA!r})")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["source_files"] = [SourceFile(**f) for f in data.get("source_files", [])]
            values["run"] = RunInfo(**(data.get("run") or {}))
            if data.get("output"):
                values["output"] = OutputInfo(**data["output"])
            if data.get("verify"):
                values["verify"] = VerifyInfo(**data["verify"])
            return cls(**values)
        except TypeError as exc:
            raise CkptError(path, f"malformed lineage record: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes, path: str | None = None) -> LineageRecord:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CkptError(path, f"lineage record is not JSON: {exc}") from None
        return cls.from_dict(data, path)

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict[str, str]:
        """A short flat view: the S3 object metadata, the asset metadata, the log line."""
        out = {
            "lineage-schema": self.schema,
            "source": self.source,
            "checkpoint": self.checkpoint or "",
            "source-digest": self.source_digest,
            "step": "" if self.step is None else str(self.step),
            "epoch": "" if self.epoch is None else str(self.epoch),
            "source-layout": f"tp{self.source_tp}-pp{self.source_pp}",
            "target-layout": f"tp{self.target_tp}-pp{self.target_pp}",
            "precision": self.precision,
            "plan-digest": self.plan_digest,
            "flow-run-id": self.run.flow_run_id or "",
            "deployment": self.run.deployment_name or "",
            "lineage": sidecar_url(self.destination).rsplit("/", 1)[-1],
        }
        if self.output is not None:
            out["sha256"] = self.output.sha256 or ""
            if self.output.checksum:
                out["crc32-composite"] = self.output.checksum
        if self.verify is not None:
            out["verify-max-abs-diff"] = f"{self.verify.max_abs_diff:.3g}"
            out["verify-passed"] = str(self.verify.passed).lower()
        return out

    def object_metadata(self) -> dict[str, str]:
        """:meth:`summary` made safe for S3 user metadata: ASCII, short values."""
        meta = {}
        for key, value in self.summary().items():
            text = value.encode("ascii", "backslashreplace").decode("ascii")
            if len(text) > _METADATA_VALUE_CHARS:
                text = text[: _METADATA_VALUE_CHARS - 3] + "..."
            meta[key] = text
        return meta

    def to_markdown(self) -> str:
        """A human-readable page for the run's artifacts."""
        out = self.output
        ver = self.verify
        rows = [
            ("destination", f"`{self.destination}`"),
            ("source", f"`{self.source}`"),
            ("checkpoint", f"`{self.checkpoint}`" if self.checkpoint else "-"),
            ("step / epoch", f"{self.step} / {self.epoch}"),
            ("layout", f"TP={self.source_tp} PP={self.source_pp} -> TP={self.target_tp} PP={self.target_pp}"),
            ("precision", self.precision),
            ("source digest", f"`{self.source_digest}`"),
            ("plan digest", f"`{self.plan_digest}`"),
            ("output", _describe_output(out)),
            ("verify", _describe_verify(ver)),
            ("flow run", f"{self.run.flow_name}/{self.run.flow_run_name} (`{self.run.flow_run_id}`)"),
            ("deployment", self.run.deployment_name or "-"),
            ("versions", ", ".join(f"{k} {v}" for k, v in sorted(self.versions.items()))),
            ("timings", ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())),
        ]  # fmt: skip
        lines = [f"# Lineage of `{self.destination.rsplit('/', 1)[-1]}`", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        lines += ["", "## Source files", "", "| file | bytes | identity |", "|---|---:|---|"]
        lines += [f"| `{f.url}` | {f.size_bytes:,} | `{f.identity}` |" for f in self.source_files]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _git_commit(repo_dir: str) -> str | None:
    if not os.path.exists(os.path.join(repo_dir, ".git")):
        return None
    try:
        head = subprocess.run(
            ["git", "-C", repo_dir, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo_dir, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def _dist_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def collect_versions(extra: tuple[str, ...] = ("prefect", "fsspec", "s3fs")) -> dict[str, str]:
    """This project (with its git commit when run from a checkout), torch, python, and ``extra``.

    Versions come from package metadata, so nothing is imported to ask.
    """
    repo_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    versions = {"python": platform.python_version()}
    for name in (PROJECT, "torch", *extra):
        v = _dist_version(name)
        if v is not None:
            versions[name] = v
    commit = _git_commit(repo_dir)
    if commit:
        versions[f"{PROJECT}-git"] = commit
    return versions


__all__ = [
    "LineageRecord",
    "MEMBER_NAME",
    "OutputInfo",
    "RunInfo",
    "SCHEMA",
    "SIDECAR_SUFFIX",
    "SourceFile",
    "VerifyInfo",
    "collect_versions",
    "files_digest",
    "sha256_file",
    "sidecar_url",
]


def _describe_output(out: OutputInfo | None) -> str:
    if out is None:
        return "-"
    if out.sha256 is None:
        return f"{out.size_bytes:,} bytes, composite CRC-32 `{out.checksum}`"
    return f"{out.size_bytes:,} bytes, sha256 `{out.sha256}`"


def _describe_verify(ver: VerifyInfo | None) -> str:
    if ver is None:
        return "not run"
    result = "passed" if ver.passed else "FAILED"
    checks = []
    if ver.items:
        checks.append(f"{ver.items} rank files, {ver.tensors} tensors checked where written")
    if ver.images:
        checks.append(
            f"max logit difference {ver.max_abs_diff:.3g} <= {ver.tolerance:g} on {ver.images} "
            f"images ({ver.device})"
        )
    return f"{result}: {'; '.join(checks) or 'nothing compared'} ({describe_method(ver.method)})"
