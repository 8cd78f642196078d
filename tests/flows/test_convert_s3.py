"""The ``convert`` flow against a real S3 server (moto) and a real Prefect API (test harness)."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest
import torch

from ckptcore.api import load_state_dict
from ckptcore.lineage import SCHEMA, LineageRecord, sha256_file
from flows.convert import convert_vit

pytestmark = pytest.mark.usefixtures("prefect_api")


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key


async def _task_runs(flow_run_id: str) -> dict[str, list[str]]:
    """{task name: [state name, ...]} of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return out


async def _artifacts(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {(a.key or a.type): a.type for a in arts}


async def _asset_events(asset: str) -> list[dict]:
    """Materialisation events of one asset (the server records events asynchronously)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for _ in range(40):
            resp = await client._client.post(
                "/events/filter",
                json={
                    "filter": {
                        "event": {"prefix": ["prefect.asset.materialization"]},
                        "resource": {"id": [asset]},
                    }
                },
            )
            events = resp.json()["events"]
            if events:
                return events
            await asyncio.sleep(0.5)
    return []


def _pending_uploads(s3, bucket: str, prefix: str) -> list[dict]:
    """Multipart uploads started under ``prefix`` and neither completed nor aborted."""
    reply = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    return reply.get("Uploads", [])


@pytest.mark.parametrize("upload", ["stream", "after"])
def test_tp2_training_checkpoint_in_s3_becomes_tp1_nemo_in_s3(
    s3, work_dir, prefix, sample_factory, monkeypatch, upload
):
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit-tp1.nemo"
    sample = sample_factory(s3, src, tp=2)

    state = convert_vit(
        upload=upload, source=src, destination=dest, target_tp=1, target_pp=1, return_state=True
    )
    assert state.is_completed(), state
    summary = state.result()

    # The .nemo holds exactly the source's tensors, merged to TP=1.
    _, src_sd = load_state_dict(src)
    cfg, out_sd = load_state_dict(dest)
    _assert_same_tensors(src_sd, out_sd)
    assert cfg["tensor_model_parallel_size"] == 1
    for key, value in sample.state_dict.items():
        if value is not None:
            assert torch.equal(out_sd[key], value), key

    # The sidecar is the complete record and matches the uploaded bytes.
    local_copy = f"{work_dir}/../downloaded.nemo"
    s3.get_file(dest.removeprefix("s3://"), local_copy)
    record = LineageRecord.from_json(s3.cat_file(f"{dest}.lineage.json".removeprefix("s3://")))
    assert record.schema == SCHEMA
    assert record.output is not None
    assert record.output.sha256 == sha256_file(local_copy)
    assert record.output.size_bytes == s3.size(dest.removeprefix("s3://"))
    assert record.verify is not None and record.verify.passed
    assert record.verify.max_abs_diff <= 1e-5
    assert (record.source_tp, record.source_pp, record.target_tp, record.target_pp) == (2, 1, 1, 1)
    assert record.step == 100 and record.epoch == 1
    assert record.checkpoint == sample.name
    assert {f.url for f in record.source_files} == {
        f"{src}/mp_rank_00/{sample.name}",
        f"{src}/mp_rank_01/{sample.name}",
    }
    for f in record.source_files:  # read in place: identified by ETag, not downloaded to hash
        info = s3.info(f.url.removeprefix("s3://"))
        assert f.etag and f.etag == info["ETag"].strip('"')
        assert f.sha256 is None
        assert f.size_bytes == info["size"]
    assert record.run.flow_name == "convert"
    assert record.run.flow_run_id == str(state.state_details.flow_run_id)
    assert record.run.parameters["source"] == src
    assert {"ckpt-pipeline", "torch", "prefect", "python"} <= set(record.versions)
    if upload == "stream":  # one pass writes the archive; the upload overlapped it and verify
        assert {"list", "write", "verify", "upload", "commit"} <= set(record.timings)
        bucket, key = dest.removeprefix("s3://").split("/", 1)
        head = s3.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC32")  # the parts went up with their CRC-32s
    else:
        assert {"list", "repartition", "package", "verify", "upload"} <= set(record.timings)
    assert "fetch" not in record.timings  # read in place: nothing was fetched

    # The archive's member is the same record before the output existed.
    import tarfile

    with tarfile.open(local_copy) as tar:
        member = json.loads(tar.extractfile("./lineage.json").read())
    assert member["output"] is None and member["verify"] is None
    assert member["source_digest"] == record.source_digest
    assert member["run"]["flow_run_id"] == record.run.flow_run_id

    # Object metadata carries the summary (streamed: as known when the upload started, so the
    # output's digest and the verify result are only in the sidecar it names).
    meta = s3.metadata(dest.removeprefix("s3://"))
    if upload == "stream":
        assert "sha256" not in meta and "verify-passed" not in meta
        assert meta["lineage"] == "vit-tp1.nemo.lineage.json"
        assert _pending_uploads(s3, "ckpt-models", prefix) == []
    else:
        assert meta["sha256"] == record.output.sha256
        assert meta["verify-passed"] == "true"
    assert meta["source"] == src
    assert meta["source-digest"] == record.source_digest
    assert meta["target-layout"] == "tp1-pp1"
    assert meta["flow-run-id"] == record.run.flow_run_id
    assert summary["sha256"] == record.output.sha256

    # Artifacts: the lineage page, the source-file table, progress of the long steps.
    arts = asyncio.run(_artifacts(record.run.flow_run_id))
    assert arts.get("lineage-vit-tp1-nemo") == "markdown"
    assert arts.get("source-files-vit-tp1-nemo") == "table"
    assert "progress" in arts.values()

    # The .nemo is an asset materialised from the source, with the lineage summary.
    events = asyncio.run(_asset_events(dest))
    assert [e["event"] for e in events] == ["prefect.asset.materialization.succeeded"]
    assert {"prefect.resource.id": src, "prefect.resource.role": "asset"} in events[0]["related"]
    assert events[0]["payload"]["sha256"] == record.output.sha256

    # Nothing is left in the work folder or the scratch prefix.
    import os

    assert os.listdir(work_dir) == []


@pytest.mark.parametrize("read", ["in-place", "download"])
def test_rerun_after_a_failed_upload_resumes_from_the_cache(
    s3, work_dir, prefix, sample_factory, monkeypatch, read
):
    """A run that fails late keeps its repartition result (and, downloading, the fetched
    files); the rerun reuses them. (Uploading after verify; streamed: the next test.)"""
    import tasks.publish

    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo"
    sample = sample_factory(s3, src, tp=2)

    calls = {"n": 0}
    real = tasks.publish.put_atomically

    def broken(*args, **kwargs):
        calls["n"] += 1
        raise PermissionError("injected: access denied")  # permanent: no retry

    monkeypatch.setattr(tasks.publish, "put_atomically", broken)
    run = functools.partial(
        convert_vit, source=src, destination=dest, target_tp=1, return_state=True
    )
    first = run(upload="after", source_read=read)
    assert first.is_failed()
    assert calls["n"] == 1  # PermissionError is not transient: tried once
    assert not s3.exists(dest.removeprefix("s3://"))

    monkeypatch.setattr(tasks.publish, "put_atomically", real)
    second = run(upload="after", source_read=read)
    assert second.is_completed(), second
    states = asyncio.run(_task_runs(str(second.state_details.flow_run_id)))
    if read == "download":
        assert states["fetch"] == ["Cached"]
    else:
        assert "fetch" not in states and states["locate-source"] == ["Completed"]
    assert states["repartition"] == ["Cached"]
    assert states["upload"] == ["Completed"]
    record = LineageRecord.from_json(s3.cat_file(f"ckpt-models/{prefix}/vit.nemo.lineage.json"))
    for f in record.source_files:
        info = s3.info(f.url.removeprefix("s3://"))
        assert f.etag == info["ETag"].strip('"')  # the identity either way: digests agree
        local = f"{sample.local}/{f.url.removeprefix(src + '/')}"
        assert f.sha256 == (sha256_file(local) if read == "download" else None)


def test_a_failed_streamed_upload_leaves_nothing_and_the_rerun_reads_the_source_from_the_cache(
    s3, proxy, work_dir, prefix, sample_factory
):
    """Every PUT to the destination fails: the parts sent while writing, then the retries of
    the whole file. The multipart upload is aborted (no object, no parts left); the rerun
    writes the archive again from the range cache the failed run left (no source byte is
    fetched twice) and completes."""
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo"
    sample = sample_factory(s3, src, tp=2)
    rule = proxy.fail("PUT", f"/ckpt-models/{prefix}/vit.nemo", count=10**6)

    first = convert_vit(source=src, destination=dest, target_tp=1, return_state=True)
    assert first.is_failed()
    assert rule.hits > 1
    assert any("partNumber=" in path for path in rule.failed)  # a part sent while writing
    assert s3.find(f"ckpt-models/{prefix}") == []
    assert _pending_uploads(s3, "ckpt-models", prefix) == []
    runs = asyncio.run(_task_runs(str(first.state_details.flow_run_id)))
    # the run's transaction rolled back: write-nemo's hook aborted its multipart upload
    assert runs["write-nemo"] == ["RolledBack"] and runs["verify"] == ["RolledBack"]
    assert runs["upload"] == ["Failed"]
    read_first = proxy.bytes_read(f"/ckpt-training/{prefix}/")
    assert read_first > 0

    rule.count = rule.hits  # the destination accepts writes again
    second = convert_vit(source=src, destination=dest, target_tp=1, return_state=True)
    assert second.is_completed(), second
    assert proxy.bytes_read(f"/ckpt-training/{prefix}/") == read_first
    runs = asyncio.run(_task_runs(str(second.state_details.flow_run_id)))
    assert runs["write-nemo"] == ["Completed"] and runs["upload"] == ["Completed"]
    _, sd = load_state_dict(dest)
    for key, value in sample.state_dict.items():
        if value is not None:
            assert torch.equal(sd[key], value), key
    assert _pending_uploads(s3, "ckpt-models", prefix) == []


@pytest.mark.parametrize("runner", [None, "threads:2"])
def test_convert_reads_only_the_weights_from_s3_once(
    s3, proxy, work_dir, prefix, sample_factory, runner
):
    """The flow reads an S3 source in place: the weights' records are fetched once (for
    repartition, or the mapped items on threads; verify reads them from the range cache), the
    optimizer state never. Counted by the proxy between the flow and the S3 server."""
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo"
    sample = sample_factory(s3, src, tp=2, size="small")
    state = convert_vit(source=src, destination=dest, target_tp=1, runner=runner, return_state=True)
    assert state.is_completed(), state
    weights = sum(v.numel() * v.element_size() for v in sample.state_dict.values() if v is not None)
    files = sum(s3.size(p) for p in s3.find(f"ckpt-training/{prefix}"))
    read = proxy.bytes_read(f"/ckpt-training/{prefix}/")
    assert files > 2.5 * weights  # two thirds of the files are optimizer state
    assert weights <= read <= 1.05 * weights, (read, weights)
    record = LineageRecord.from_json(s3.cat_file(f"ckpt-models/{prefix}/vit.nemo.lineage.json"))
    assert record.verify is not None and record.verify.passed
    import os

    assert os.listdir(work_dir) == []  # the range cache went with the other work files
