"""The mapped mode on a local Ray cluster: the ``.nemo`` equals the one-process run's byte for
byte (``lineage.json`` aside), the items ran in Ray workers, nothing is left behind."""

from __future__ import annotations

import asyncio
import os

import pytest
from flow_helpers import converted_pair, subflow_id, work_items_table

from flows.convert import convert_vit


@pytest.mark.usefixtures("prefect_api")
def test_ray_local_cluster_output_equals_the_one_process_run(
    s3, work_dir, prefix, sample_factory, monkeypatch, small_parts
):
    """Ray workers write the final archive in place (parts of one multipart upload)."""
    pytest.importorskip("prefect_ray")
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2)
    monkeypatch.setenv("CKPT_SCRATCH_URL", f"s3://ckpt-scratch/{prefix}")
    monkeypatch.setenv("CKPT_RUNNER_WORKERS", "2")  # the local cluster's CPUs
    layout = {"target_tp": 2, "target_pp": 2}  # 4 work items (tiny ViT: 2 layers)
    dests = [f"s3://ckpt-models/{prefix}/{name}.nemo" for name in ("one", "ray")]
    convert_vit(source=src, destination=dests[0], **layout)
    convert_vit(source=src, destination=dests[1], runner="ray", **layout)

    a, b, ra, rb = converted_pair(s3, dests)
    assert (rb.source_files, rb.source_digest, rb.plan_digest) == (
        ra.source_files, ra.source_digest, ra.plan_digest,
    )  # fmt: skip
    assert rb.verify is not None and rb.verify.passed
    assert (rb.verify.method, rb.verify.items) == ("items", 4)
    assert rb.run.parameters["runner"] == "ray"
    assert any("on RayTaskRunner on a local Ray cluster (2 CPUs)" in n for n in rb.notes), rb.notes

    rows = asyncio.run(work_items_table(subflow_id(rb, "assemble-items")))
    pieces = [r for r in rows if r["task"] == "write-piece"]
    assert len(pieces) >= 2 and all(r["worker"].startswith("ray:") for r in pieces), rows
    assert all(r["tensors_checked"] > 0 for r in pieces)
    (tail,) = [r for r in rows if r["task"] == "write-tail"]
    assert tail["write_bytes"] < len(b) / 3
    uploads = s3.call_s3("list_multipart_uploads", Bucket="ckpt-models", Prefix=prefix)
    assert uploads.get("Uploads", []) == []
    assert s3.find(f"ckpt-scratch/{prefix}") == []
    assert os.listdir(work_dir) == []
