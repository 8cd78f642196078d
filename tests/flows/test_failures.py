"""Failures: a failed verify uploads nothing; S3 errors are retried for real; an upload killed
mid-way leaves no object at the destination."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from flow_helpers import clear_s3_cache
from prefect import flow

from ckptcore.api import load_state_dict
from ckptcore.errors import CkptError
from ckptcore.lineage import LineageRecord, sha256_file
from flows.convert import convert_vit
from tasks.source import list_source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _task_runs(flow_run_id: str) -> dict[str, list[tuple[str, int]]]:
    """{task name: [(state name, run count), ...]} of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    out: dict[str, list[tuple[str, int]]] = {}
    for run in runs:
        out.setdefault(run.name.rsplit("-", 1)[0], []).append((run.state.name, run.run_count))
    return out


def _nudge_head_weight(state_dict_bytes: bytes) -> bytes:
    """The same ``model_weights.ckpt`` bytes with one head weight off by 1e-3."""
    import io
    import struct

    sd = torch.load(io.BytesIO(state_dict_bytes), weights_only=True)
    data = sd["model.head.dense_out.weight"].contiguous().numpy().tobytes()
    at = state_dict_bytes.find(data)
    assert at >= 0 and state_dict_bytes.find(data, at + 1) < 0
    (first,) = struct.unpack_from("<f", state_dict_bytes, at)
    out = bytearray(state_dict_bytes)
    struct.pack_into("<f", out, at, first + 1e-3)
    return bytes(out)


def _buggy_repartition(monkeypatch: pytest.MonkeyPatch, upload: str) -> None:
    """Make the repartition step of ``upload`` mode write a wrong head weight."""
    if upload == "after":
        import tasks.convert

        real = tasks.convert.write_rank_files

        def buggy_write_rank_files(ck, plan, out_dir, **kwargs):
            files = real(ck, plan, out_dir, **kwargs)
            path = files["model_weights.ckpt"]
            with open(path, "rb") as f:
                data = _nudge_head_weight(f.read())
            with open(path, "wb") as f:
                f.write(data)
            return files

        monkeypatch.setattr(tasks.convert, "write_rank_files", buggy_write_rank_files)
        return
    import tasks.stream
    from ckptcore.formats.nemo import MemberSource

    real_members = tasks.stream.nemo_members

    def buggy_members(ck, plan, **kwargs):
        members = real_members(ck, plan, **kwargs)
        good = members["model_weights.ckpt"]

        def produce(sink) -> None:
            chunks: list[bytes] = []
            good.write(lambda data: chunks.append(bytes(data)))
            sink(_nudge_head_weight(b"".join(chunks)))

        members["model_weights.ckpt"] = MemberSource(good.size, produce)
        return members

    monkeypatch.setattr(tasks.stream, "nemo_members", buggy_members)


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("upload", ["stream", "after"])
def test_failed_verify_uploads_nothing(s3, work_dir, prefix, sample_factory, monkeypatch, upload):
    """A repartition bug (one head weight off by 1e-3) is caught by verify; nothing is uploaded
    (streamed: the parts sent while writing are dropped with their multipart upload)."""
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo"
    sample_factory(s3, src, tp=2)
    _buggy_repartition(monkeypatch, upload)
    state = convert_vit(upload=upload, source=src, destination=dest, target_tp=1, return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception, match="verify failed: max \\|logit diff\\|"):
        state.result()
    assert s3.find(f"ckpt-models/{prefix}") == []
    pending = s3.call_s3("list_multipart_uploads", Bucket="ckpt-models", Prefix=prefix)
    assert pending.get("Uploads", []) == []
    runs = asyncio.run(_task_runs(str(state.state_details.flow_run_id)))
    assert runs["verify"] == [("Failed", 1)]  # a CkptError is never retried
    assert "upload" not in runs
    if upload == "stream":  # rolled back with the run's transaction: its upload aborted
        assert runs["write-nemo"] == [("RolledBack", 1)]


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("where", ["s3", "folder"])
def test_a_wrong_byte_in_a_piece_is_caught_where_it_was_written(
    s3, work_dir, prefix, sample_factory, monkeypatch, small_parts, tmp_path, where
):
    """The workers write the archive in place (``runner``); a piece whose rank file comes out
    one head weight off fails its own check, and nothing appears at the destination: no
    object, no open upload, no work file beside a local destination."""
    import ckptcore.assembly
    from ckptcore.formats.nemo import MemberSource

    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2)
    out = tmp_path / "out"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo" if where == "s3" else str(out / "vit.nemo")
    real = ckptcore.assembly.rank_member

    def buggy_rank_member(ck, fp):
        good = real(ck, fp)

        def produce(sink) -> None:
            chunks: list[bytes] = []
            good.write(lambda data: chunks.append(bytes(data)))
            sink(_nudge_head_weight(b"".join(chunks)))

        return MemberSource(good.size, produce)

    monkeypatch.setattr(ckptcore.assembly, "rank_member", buggy_rank_member)
    state = convert_vit(
        source=src, destination=dest, target_tp=1, runner="threads:1", return_state=True
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="dense_out.weight.*differs from its source slice"):
        state.result()
    assert s3.find(f"ckpt-models/{prefix}") == []
    pending = s3.call_s3("list_multipart_uploads", Bucket="ckpt-models", Prefix=prefix)
    assert pending.get("Uploads", []) == []
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.usefixtures("prefect_api")
def test_s3_errors_during_upload_are_retried_and_the_result_is_complete(
    s3, proxy, work_dir, prefix, sample_factory, monkeypatch
):
    """The first 3 PUTs of the .nemo get HTTP 500. botocore retries once (AWS_MAX_ATTEMPTS=2),
    then the upload task fails and Prefect retries it; the object ends up whole."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    clear_s3_cache()
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo"
    sample = sample_factory(s3, src, tp=2)
    rule = proxy.fail("PUT", f"/ckpt-models/{prefix}/vit.nemo", count=3)
    proxy.fail("PUT", f"/ckpt-models/{prefix}/vit.nemo.lineage.json", count=1)  # sidecar: once

    state = convert_vit(source=src, destination=dest, target_tp=1, return_state=True)

    assert state.is_completed(), state
    assert rule.hits == 3
    runs = asyncio.run(_task_runs(str(state.state_details.flow_run_id)))
    assert runs["upload"] == [("Completed", 2)]  # failed once, retried by Prefect
    record = LineageRecord.from_json(s3.cat_file(f"ckpt-models/{prefix}/vit.nemo.lineage.json"))
    local = os.path.join(work_dir, "..", "check.nemo")
    s3.get_file(f"ckpt-models/{prefix}/vit.nemo", local)
    assert sha256_file(local) == record.output.sha256
    _, sd = load_state_dict(local)
    for key, value in sample.state_dict.items():
        if value is not None:
            assert torch.equal(sd[key], value), key


@flow
def _list_only(source: str) -> int:
    return len(list_source(source).files)


@pytest.mark.usefixtures("prefect_api")
def test_transient_listing_errors_are_retried_but_missing_sources_are_not(
    s3, proxy, work_dir, prefix, sample_factory, monkeypatch
):
    """Two listings answered with HTTP 500: the list task is retried by Prefect and succeeds.
    A missing source is a CkptError: one attempt, no retry."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    clear_s3_cache()
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=1)
    clear_s3_cache()
    rule = proxy.fail("GET", f"/ckpt-training?list-type=2&prefix={prefix}", count=2)

    state = _list_only(src, return_state=True)
    assert state.is_completed() and state.result() == 1
    assert rule.hits == 2
    runs = asyncio.run(_task_runs(str(state.state_details.flow_run_id)))
    assert runs["list-source"] == [("Completed", 3)]

    state = _list_only(f"s3://ckpt-training/{prefix}/nothing-here", return_state=True)
    assert state.is_failed()
    with pytest.raises(CkptError, match="not found"):
        state.result()
    runs = asyncio.run(_task_runs(str(state.state_details.flow_run_id)))
    assert runs["list-source"] == [("Failed", 1)]


_KILLED_UPLOAD = textwrap.dedent(
    """
    import sys
    from tasks.publish import put_atomically
    put_atomically(sys.argv[1], sys.argv[2], metadata={"sha256": "x"})
    """
)


def test_an_upload_killed_midway_leaves_no_object(s3, proxy, tmp_path, prefix, monkeypatch):
    """Like a cancelled run: the process dies during a multipart upload (part 2 is held at
    the proxy, then the process gets SIGKILL). No object appears at the destination."""
    monkeypatch.setenv("CKPT_UPLOAD_CHUNK_BYTES", str(5 << 20))
    big = tmp_path / "big.nemo"
    big.write_bytes(os.urandom(11 << 20))  # 3 parts of 5 MiB
    key = f"ckpt-models/{prefix}/big.nemo"
    held = proxy.fail("PUT", f"/{key}?", count=1, mode="hold", skip=1)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_UPLOAD, str(big), f"s3://{key}"], env=env, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 60
        while held.hits == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert held.hits == 1, f"the upload never reached part 2 (exit {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        held.release.set()
    clear_s3_cache()
    assert not s3.exists(key)
    uploads = s3.call_s3("list_multipart_uploads", Bucket="ckpt-models", Prefix=f"{prefix}/")
    assert len(uploads.get("Uploads", [])) == 1  # invisible; a bucket lifecycle rule expires it


def test_a_local_upload_that_fails_midway_leaves_no_file(tmp_path):
    from tasks.progress import Progress
    from tasks.publish import put_atomically

    src = tmp_path / "model.nemo"
    src.write_bytes(os.urandom(20 << 20))
    dest = tmp_path / "out" / "model.nemo"

    class Boom(Progress):
        def advance(self, nbytes: int) -> None:
            super().advance(nbytes)
            if self.done > (8 << 20):
                raise KeyboardInterrupt  # what a cancelled run sees

    with pytest.raises(KeyboardInterrupt):
        put_atomically(str(src), str(dest), progress=Boom("upload", 20 << 20))
    assert os.listdir(dest.parent) == []
    put_atomically(str(src), str(dest))
    assert sha256_file(str(dest)) == sha256_file(str(src))


@pytest.mark.usefixtures("prefect_api")
def test_a_source_read_failing_mid_write_retries_write_nemo_and_aborts_its_upload(
    s3, proxy, work_dir, prefix, sample_factory, monkeypatch
):
    """One ranged GET of the source answers 500 while the archive is being written (the 29th of
    ~39 GETs of that rank file; the multipart upload starts after ~23) (no botocore
    retry here): write-nemo fails, aborts the multipart upload it had started, and Prefect's
    retry writes the archive again; nothing is left pending and the result is whole."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    clear_s3_cache()
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo"
    sample = sample_factory(s3, src, tp=2, size="small")
    started = len(proxy.seen)
    rule = proxy.fail("GET", f"/ckpt-training/{prefix}/checkpoints/mp_rank_01/", count=1, skip=28)

    state = convert_vit(source=src, destination=dest, target_tp=1, return_state=True)

    assert state.is_completed(), state
    assert rule.hits == 1
    runs = asyncio.run(_task_runs(str(state.state_details.flow_run_id)))
    assert runs["write-nemo"] == [("Completed", 2)]
    seen = proxy.seen[started:]
    uploads = [p for m, p in seen if m == "POST" and p.endswith("vit.nemo?uploads")]
    assert len(uploads) == 2  # the failed attempt had started its upload
    assert any(m == "DELETE" and "vit.nemo?uploadId=" in p for m, p in seen)  # and aborted it
    pending = s3.call_s3("list_multipart_uploads", Bucket="ckpt-models", Prefix=prefix)
    assert pending.get("Uploads", []) == []
    _, sd = load_state_dict(dest)
    for key, value in sample.state_dict.items():
        if value is not None:
            assert torch.equal(sd[key], value), key
