"""The mapped mode of ``convert``: work items on a Dask ``LocalCluster`` (and on threads), against
the moto S3 server, bitwise equal to the one-process run.

The Dask workers are separate processes: they find moto through ``AWS_ENDPOINT_URL_S3``, which
the ``s3`` fixture puts in ``os.environ`` before the cluster is spawned (they inherit it), and
the Prefect API through the settings context Prefect sends along with each task.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from flow_helpers import assert_same_archive, converted_pair, subflow_id, work_items_table

from ckptcore.errors import CkptError
from ckptcore.lineage import LineageRecord
from ckptcore.sources import open_checkpoint
from flows.convert import convert_vit
from flows.routes import ConvertJob
from tasks import settings
from tasks.items import RunnerSpec, local_cluster_kwargs, parse_runner

TWO_PROCESSES = {
    "n_workers": 2,
    "processes": True,
    "threads_per_worker": 1,
    "dashboard_address": None,
}


@pytest.mark.usefixtures("prefect_api")
def test_dask_local_cluster_output_equals_the_one_process_run(
    s3, work_dir, prefix, sample_factory, monkeypatch, small_parts
):
    """The workers write the final archive in place (parts of one multipart upload): byte for
    byte the one-process run's (``lineage.json`` aside), nothing staged, checked where written."""
    pytest.importorskip("prefect_dask")
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2)
    monkeypatch.setenv("CKPT_SCRATCH_URL", f"s3://ckpt-scratch/{prefix}")
    monkeypatch.setenv("CKPT_RUNNER_WORKERS", "2")
    assert local_cluster_kwargs(settings.runner_workers()) == TWO_PROCESSES
    layout = {"target_tp": 2, "target_pp": 2}  # 4 rank files (tiny ViT: 2 layers)

    dests = [f"s3://ckpt-models/{prefix}/{name}.nemo" for name in ("one", "dask")]
    t0 = time.perf_counter()
    convert_vit(source=src, destination=dests[0], **layout)
    t1 = time.perf_counter()
    convert_vit(source=src, destination=dests[1], runner="dask", **layout)
    t2 = time.perf_counter()
    print(f"one process {t1 - t0:.1f} s, dask (2 workers, with cluster start) {t2 - t1:.1f} s")

    a, b, ra, rb = converted_pair(s3, dests)
    assert rb.source_files == ra.source_files  # the same ETag per file, as listed
    assert rb.source_digest == ra.source_digest
    assert rb.plan_digest == ra.plan_digest
    assert (rb.source_tp, rb.source_pp, rb.target_tp, rb.target_pp) == (2, 1, 2, 2)
    assert (rb.step, rb.epoch, rb.checkpoint) == (ra.step, ra.epoch, ra.checkpoint)
    assert rb.run.parameters["runner"] == "dask"
    # checked where written: every rank file, every tensor; no model run (the upload is not
    # readable before it is completed); the output named by S3's checksum of its parts
    assert rb.verify is not None and rb.verify.passed and rb.verify.method == "items"
    assert rb.verify.items == 4 and rb.verify.tensors > 0 and rb.verify.images == 0
    assert rb.output.sha256 is None and rb.output.size_bytes == len(b)
    head = s3.call_s3(
        "head_object", Bucket="ckpt-models", Key=f"{prefix}/dask.nemo", ChecksumMode="ENABLED"
    )
    crc, parts = rb.output.checksum.split("-")
    assert crc == head["ChecksumCRC32"].split("-")[0] and int(parts) >= 3  # moto omits "-<parts>"

    # Pieces spread over the two worker processes; the flow wrote only the tail.
    rows = asyncio.run(work_items_table(subflow_id(rb, "assemble-items")))
    pieces = [r for r in rows if r["task"] == "write-piece"]
    members = sorted(m for r in pieces for m in r["what"].split(", "))
    ranks = [f"tp_rank_0{t}_pp_rank_00{p}/model_weights.ckpt" for p in range(2) for t in range(2)]
    assert set(ranks) - set(members) <= {ranks[-1]}  # the last may ride with the tail
    workers = {r["worker"] for r in pieces}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers
    assert all(r["tensors_checked"] > 0 and r["read_bytes"] > 0 for r in pieces)
    (tail,) = [r for r in rows if r["task"] == "write-tail"]
    assert tail["worker"] == "flow" and tail["write_bytes"] < len(b) / 3

    # Nothing staged, no upload left open, no work files.
    assert s3.find(f"ckpt-scratch/{prefix}") == []
    uploads = s3.call_s3("list_multipart_uploads", Bucket="ckpt-models", Prefix=prefix)
    assert uploads.get("Uploads", []) == []
    import os

    assert os.listdir(work_dir) == []


@pytest.mark.usefixtures("prefect_api")
def test_workers_assemble_into_a_shared_folder_and_the_logits_are_checked_on_a_worker(
    tmp_path, work_dir, sample_factory
):
    """A local (shared-folder) destination: the pieces are written at their offsets in one
    file beside it, the logit check and the sha256 run on a worker before the file is renamed
    into place; the archive equals the one-process run's."""
    sample = sample_factory(None, None, tp=2)
    dests = [str(tmp_path / "out" / f"{n}.nemo") for n in ("one", "pieces")]
    convert_vit(source=sample.local, destination=dests[0], target_tp=1, target_pp=2)
    convert_vit(
        source=sample.local, destination=dests[1], target_tp=1, target_pp=2, runner="threads:2"
    )
    a, b = (open(d, "rb").read() for d in dests)
    assert_same_archive(a, b)
    record = LineageRecord.from_json(open(dests[1] + ".lineage.json").read())
    assert record.verify.method == "items+same-weights" and record.verify.items == 2
    assert record.verify.images >= 1 and record.verify.passed
    import hashlib

    assert record.output.sha256 == hashlib.sha256(b).hexdigest()
    rows = asyncio.run(work_items_table(subflow_id(record, "assemble-items")))
    assert sorted(r["task"] for r in rows) == ["write-piece", "write-piece", "write-tail"]
    import os

    assert sorted(os.listdir(tmp_path / "out")) == [
        "one.nemo", "one.nemo.lineage.json", "pieces.nemo", "pieces.nemo.lineage.json",
    ]  # fmt: skip
    assert os.listdir(work_dir) == []


@pytest.mark.usefixtures("prefect_api")
def test_threads_runner_local_source_resumes_finished_items(
    tmp_path, work_dir, sample_factory, monkeypatch
):
    """Local source and staging on threads; a rerun finds the staged items and skips them."""
    monkeypatch.delenv("CKPT_SCRATCH_URL", raising=False)
    monkeypatch.setenv("CKPT_STAGING_URL", str(tmp_path / "staging"))
    monkeypatch.setenv("CKPT_KEEP_WORK", "1")
    sample = sample_factory(None, None, tp=2)
    dests = [str(tmp_path / "a.nemo"), str(tmp_path / "b.nemo")]
    for dest in dests:
        convert_vit(
            runner="threads:2", assemble="staged", source=sample.local, destination=dest,
            target_tp=1,
        )  # fmt: skip
    notes = [LineageRecord.from_json(open(d + ".lineage.json").read()).notes for d in dests]
    assert any(
        "1 work items on 1 worker(s) by ThreadPoolTaskRunner (2 threads)" in n for n in notes[0]
    )
    assert any("1 found complete from an earlier run" in n for n in notes[1])
    assert_same_archive(open(dests[0], "rb").read(), open(dests[1], "rb").read())
    for key, value in sample.state_dict.items():
        with open_checkpoint(dests[0]) as ck:
            if value is not None:
                assert torch.equal(ck.ranks[(0, 0)].tensor(key), value), key


def test_runner_specs():
    assert ConvertJob("src").runner is None
    assert ConvertJob("src", runner="dask").runner == "dask"
    assert ConvertJob("src", runner=" inline ").runner is None
    assert ConvertJob("src", runner="threads:4").runner == "threads:4"
    with pytest.raises(CkptError, match="expected threads"):
        ConvertJob("src", runner="spark")
    assert parse_runner("threads:4") == RunnerSpec("threads", None, 4)
    assert parse_runner("dask", 3) == RunnerSpec("dask", None, 3)
    assert parse_runner("dask://10.0.0.5:8786") == RunnerSpec("dask", "tcp://10.0.0.5:8786")
    assert parse_runner("tls://sched:8786") == RunnerSpec("dask", "tls://sched:8786")
    assert parse_runner("ray://head:10001") == RunnerSpec("ray", "ray://head:10001")
