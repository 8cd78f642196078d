"""The mapped mode on a local Ray cluster: the ``.nemo`` equals the one-process run's byte for
byte (``lineage.json`` aside), the items ran in Ray workers, nothing is left behind."""

from __future__ import annotations

import asyncio
import os

import pytest
from flow_helpers import assert_same_archive, assert_same_ranks, subflow_id, work_items_table

from ckptcore.lineage import LineageRecord
from flows.convert import convert_vit


@pytest.mark.usefixtures("prefect_api")
def test_ray_local_cluster_output_equals_the_one_process_run(
    s3, work_dir, prefix, sample_factory, monkeypatch
):
    pytest.importorskip("prefect_ray")
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2)
    monkeypatch.setenv("CKPT_SCRATCH_URL", f"s3://ckpt-scratch/{prefix}")
    monkeypatch.setenv("CKPT_RUNNER_WORKERS", "2")  # the local cluster's CPUs
    layout = {"target_tp": 2, "target_pp": 2}  # 4 work items (tiny ViT: 2 layers)
    dests = [f"s3://ckpt-models/{prefix}/{name}.nemo" for name in ("one", "ray")]
    convert_vit(source=src, destination=dests[0], **layout)
    convert_vit(source=src, destination=dests[1], runner="ray", **layout)

    a, b = (s3.cat_file(d.removeprefix("s3://")) for d in dests)
    assert_same_archive(a, b)
    assert_same_ranks(*dests)
    ra, rb = (
        LineageRecord.from_json(s3.cat_file(f"{d}.lineage.json".removeprefix("s3://")))
        for d in dests
    )
    assert (rb.source_files, rb.source_digest, rb.plan_digest) == (
        ra.source_files, ra.source_digest, ra.plan_digest,
    )  # fmt: skip
    assert rb.verify is not None and rb.verify.passed
    assert rb.run.parameters["runner"] == "ray"
    assert any("RayTaskRunner on a local Ray cluster (2 CPUs)" in n for n in rb.notes), rb.notes

    rows = asyncio.run(work_items_table(subflow_id(rb)))
    assert sorted(r["what"] for r in rows) == sorted(
        f"tp_rank_0{t}_pp_rank_00{p}/model_weights.ckpt" for p in range(2) for t in range(2)
    )
    assert all(r["worker"].startswith("ray:") for r in rows), rows  # in Ray worker processes
    assert not any(r["resumed"] for r in rows)
    assert s3.find(f"ckpt-scratch/{prefix}") == []
    assert os.listdir(work_dir) == []
