"""Whole-model I/O: a checkpoint merged into one state dict, and ``.nemo`` archives written from
plans (rank files produced on the fly, streamed into a local file or a multipart upload).

The model (:mod:`ckptcore.model.vit`) and the operations (:mod:`ckptcore.api`) both build on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ckptcore.engine import execute, file_layout, materialize, write_rank
from ckptcore.errors import CkptError, storage_error
from ckptcore.follow import Follower
from ckptcore.formats import nemo as nemo_fmt
from ckptcore.formats.zipwriter import file_sink
from ckptcore.output import atomic_output, check_destination
from ckptcore.plan import Plan, build_plan
from ckptcore.sources import Checkpoint, open_checkpoint
from ckptcore.storage import RangeCache, get_fs, is_local, local_path

Progress = Callable[[str, int], None]


def write_rank_files(
    ck: Checkpoint,
    plan: Plan,
    out_dir: str,
    workers: int = 1,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Every target rank file plus ``model_config.yaml`` under ``out_dir``; {member: path}.

    This is the extracted-``.nemo`` form (NeMo restores a folder too); :func:`convert` streams
    straight into the archive instead.
    """
    paths = execute(
        plan, ck, out_dir, workers=workers, allow_nonfinite=allow_nonfinite, on_tensor=progress
    )
    files = {os.path.relpath(p, out_dir).replace(os.sep, "/"): p for p in paths}
    cfg_path = os.path.join(out_dir, nemo_fmt.CONFIG_NAME)
    with open(cfg_path, "wb") as f:
        f.write(nemo_fmt.dump_config(plan.config))
    files[nemo_fmt.CONFIG_NAME] = cfg_path
    return files


def nemo_members(
    ck: Checkpoint,
    plan: Plan,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> dict[str, nemo_fmt.MemberData]:
    """The archive's members with rank files produced on the fly (sizes known from the plan)."""
    members: dict[str, nemo_fmt.MemberData] = {
        nemo_fmt.CONFIG_NAME: nemo_fmt.dump_config(plan.config)
    }
    for fp in plan.files:
        layout = file_layout(fp)

        def produce(sink, fp=fp, layout=layout) -> None:
            write_rank(ck, fp, sink, layout, allow_nonfinite, progress)

        members[fp.path] = nemo_fmt.MemberSource(layout.size, produce)
    return members


def member_at(url: str, chunk_bytes: int = 8 << 20) -> nemo_fmt.MemberData:
    """An archive member read from ``url``: a local path (copied by the kernel), or the object
    streamed in while the archive is written (no local copy); a size change fails."""
    if is_local(url):
        return local_path(url)
    fs, path = get_fs(url)
    size = int(fs.size(path))

    def produce(sink) -> None:
        got = 0
        with fs.open(path, "rb", block_size=chunk_bytes) as f:
            while chunk := f.read(chunk_bytes):
                sink(chunk)
                got += len(chunk)
        if got != size:
            raise CkptError(url, f"changed while being packaged: {got} bytes, expected {size}")

    return nemo_fmt.MemberSource(size, produce)


def package_nemo(
    files: dict[str, nemo_fmt.MemberData],
    dest: str,
    sources: list[str] = (),
    overwrite: bool = False,
) -> int:
    """Write the archive of ``files`` ({member: path, bytes or producer}) to ``dest`` atomically.

    Local: a temporary file beside ``dest``, fsynced, then renamed. Object storage: streamed as
    a multipart upload while it is produced (no local copy); the object appears only when the
    upload completes, and a failure aborts it.
    """
    if is_local(dest):
        with atomic_output(dest, list(sources), overwrite) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                size = nemo_fmt.write_nemo(file_sink(fd), files)
                os.fsync(fd)
            finally:
                os.close(fd)
        return size
    check_destination(dest, list(sources), overwrite)
    fs, path = get_fs(dest)
    total = sum(
        m.size
        if isinstance(m, nemo_fmt.MemberSource)
        else len(m)
        if isinstance(m, bytes)
        else os.path.getsize(m)
        for m in files.values()
    )
    part = max(16 << 20, -(-total // 9000))  # S3 allows 10,000 parts
    try:
        out = fs.open(path, "wb", block_size=part)
    except Exception as exc:
        raise storage_error(dest, "upload failed", exc) from exc

    def sink(data: bytes | memoryview) -> None:
        try:
            out.write(data)
        except Exception as exc:
            raise storage_error(dest, "upload failed", exc) from exc

    try:
        size = nemo_fmt.write_nemo(sink, files)
        try:
            out.close()
        except Exception as exc:
            raise storage_error(dest, "upload failed", exc) from exc
    except BaseException:
        discard = getattr(out, "discard", None)
        if discard is not None:
            try:
                discard()  # aborts the multipart upload: nothing appears at dest
            except Exception:
                pass  # the upload never completes without its final request either
            out.closed = True  # nothing left to flush; keeps __del__ from uploading
        raise
    return size


def write_nemo_file(
    files: dict[str, nemo_fmt.MemberData], path: str, followers: Sequence[Follower] = ()
) -> int:
    """Write the archive of ``files`` to the local file ``path`` (created or truncated); its size.

    A work file, not a destination: no lock, no rename, no fsync. Each of ``followers`` hears
    how far the file is written as it grows and, once it is whole, its size
    (:mod:`ckptcore.follow`: a digest, an upload). A failed write raises with the followers
    unfinished: the caller cancels them.
    """

    def advance(position: int) -> None:
        for follower in followers:
            follower.written(position)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = nemo_fmt.write_nemo(file_sink(fd, write_behind=False, on_advance=advance), files)
    finally:
        os.close(fd)
    for follower in followers:
        follower.finish(size)
    return size


def load_state_dict(
    source: str | Checkpoint, checkpoint: str = "last", cache: RangeCache | str | None = None
) -> tuple[dict, dict]:
    """(config, merged TP=1/PP=1 state dict) of any supported checkpoint.

    ``cache``: keep (and reuse) the ranges read from object storage in this local folder."""
    ck = source if isinstance(source, Checkpoint) else open_checkpoint(source, checkpoint, cache)
    try:
        plan = build_plan(ck, 1, 1)
        return plan.config, materialize(ck, plan.files[0])
    finally:
        if not isinstance(source, Checkpoint):
            ck.close()
