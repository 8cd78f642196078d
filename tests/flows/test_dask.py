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
from flow_helpers import assert_same_archive, assert_same_ranks, subflow_id, work_items_table

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
    s3, work_dir, prefix, sample_factory, monkeypatch
):
    pytest.importorskip("prefect_dask")
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2)
    monkeypatch.setenv("CKPT_SCRATCH_URL", f"s3://ckpt-scratch/{prefix}")
    monkeypatch.setenv("CKPT_RUNNER_WORKERS", "2")
    assert local_cluster_kwargs(settings.runner_workers()) == TWO_PROCESSES
    layout = {"target_tp": 2, "target_pp": 2}  # 4 work items (tiny ViT: 2 layers)

    dests = [f"s3://ckpt-models/{prefix}/{name}.nemo" for name in ("one", "dask")]
    t0 = time.perf_counter()
    convert_vit(source=src, destination=dests[0], **layout)
    t1 = time.perf_counter()
    convert_vit(source=src, destination=dests[1], runner="dask", **layout)
    t2 = time.perf_counter()
    print(f"one process {t1 - t0:.1f} s, dask (2 workers, with cluster start) {t2 - t1:.1f} s")

    a, b = (s3.cat_file(d.removeprefix("s3://")) for d in dests)
    assert_same_archive(a, b)
    assert_same_ranks(*dests)

    ra, rb = (
        LineageRecord.from_json(s3.cat_file(f"{d}.lineage.json".removeprefix("s3://")))
        for d in dests
    )
    assert rb.source_files == ra.source_files  # the same ETag per file, as listed
    assert rb.source_digest == ra.source_digest
    assert rb.plan_digest == ra.plan_digest
    assert (rb.source_tp, rb.source_pp, rb.target_tp, rb.target_pp) == (2, 1, 2, 2)
    assert (rb.step, rb.epoch, rb.checkpoint) == (ra.step, ra.epoch, ra.checkpoint)
    assert rb.verify is not None and rb.verify.passed
    assert rb.run.parameters["runner"] == "dask"

    # Four items spread over the two worker processes; nothing else reads the source.
    rows = asyncio.run(work_items_table(subflow_id(rb)))
    items = [r for r in rows if r["task"] == "write-item"]
    assert sorted(r["what"] for r in items) == sorted(
        f"tp_rank_0{t}_pp_rank_00{p}/model_weights.ckpt" for p in range(2) for t in range(2)
    )
    assert {r["task"] for r in rows} == {"write-item"}
    workers = {r["worker"] for r in rows}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers
    assert not any(r["resumed"] for r in rows)

    # Staged items and work files are gone.
    assert s3.find(f"ckpt-scratch/{prefix}") == []
    import os

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
        convert_vit(runner="threads:2", source=sample.local, destination=dest, target_tp=1)
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
