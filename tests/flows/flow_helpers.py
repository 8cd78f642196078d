"""Helpers shared by the flow tests (imported by name: this folder is on ``sys.path``)."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from dataclasses import dataclass

import torch

from ckptcore.lineage import LineageRecord
from ckptcore.sources import open_checkpoint

BUCKETS = ("ckpt-training", "ckpt-models", "ckpt-scratch")


def clear_s3_cache() -> None:
    """Forget cached s3fs clients (they keep the endpoint they were made with)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class Sample:
    """A sample training checkpoint: where it is and the TP=1 weights it was made from."""

    local: str
    url: str
    name: str
    state_dict: dict
    config: dict


def make_sample(
    tmp_path,
    s3fs_or_none,
    url: str | None,
    *,
    tp: int = 2,
    pp: int = 1,
    step: int = 100,
    last: bool = True,
    seed: int = 0,
    size: str = "tiny",
    local: str | None = None,
    unfinished: bool = False,
    **config_overrides,
) -> Sample:
    """Write a realistic NeMo ViT training checkpoint (with optimizer state) and upload it.

    ``local`` reuses a training folder (several checkpoints side by side); ``url`` is where the
    folder is uploaded (``None``: stay local).
    """
    from ckptcore.sample import vit_config, write_training_checkpoint

    local = local or str(tmp_path / f"train-{uuid.uuid4().hex[:6]}" / "checkpoints")
    cfg = vit_config(size, **config_overrides)
    name, sd = write_training_checkpoint(
        local, cfg, tp=tp, pp=pp, step=step, last=last, seed=seed, unfinished=unfinished
    )
    if url is None:
        return Sample(local, local, name, sd, cfg)
    s3fs_or_none.put(local + "/", url.removeprefix("s3://") + "/", recursive=True)
    return Sample(local, url, name, sd, cfg)


# ------------------------------------------------------------------ the mapped mode


def archive_members(blob: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def assert_same_archive(a: bytes, b: bytes) -> None:
    """Same members in the same order with the same headers and bytes; ``lineage.json`` (run
    ids, timings) may differ."""
    ma, mb = archive_members(a), archive_members(b)
    assert [m.name for m, _ in ma] == [m.name for m, _ in mb]
    for (ia, da), (ib, db) in zip(ma, mb, strict=True):
        if ia.name == "./lineage.json":
            continue
        fields = ("size", "mode", "type", "uid", "gid", "uname", "gname", "mtime")
        assert [getattr(ia, f) for f in fields] == [getattr(ib, f) for f in fields], ia.name
        assert da == db, ia.name


def assert_same_ranks(a: str, b: str) -> None:
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        assert (ca.tp, ca.pp) == (cb.tp, cb.pp)
        assert sorted(ca.ranks) == sorted(cb.ranks)
        for rank, ra in ca.ranks.items():
            rb = cb.ranks[rank]
            assert list(ra.state) == list(rb.state), rank
            for key, value in ra.state.items():
                if value is None:
                    assert rb.state[key] is None
                    continue
                ta, tb = ra.tensor(key), rb.tensor(key)
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), (rank, key)


async def work_items_table(flow_run_id: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    data = [a.data for a in arts if a.key == "work-items"]
    assert len(data) == 1, [a.key for a in arts]
    return json.loads(data[0]) if isinstance(data[0], str) else data[0]


def subflow_id(record: LineageRecord, flow: str = "repartition-items") -> str:
    """The id of the ``repartition-items`` (or ``assemble-items``) run the record's note names."""
    start = {"repartition-items": "repartitioned as", "assemble-items": "assembled in place"}[flow]
    note = next(n for n in record.notes if n.startswith(start))
    return note.rsplit(", ", 1)[-1].split(")", 1)[0]


def converted_pair(s3, dests: list[str]) -> tuple[bytes, bytes, LineageRecord, LineageRecord]:
    """Two ``s3://`` outputs of the same conversion, their bytes and lineage sidecars, after
    checking they are the same archive (``lineage.json`` aside) with the same rank files."""
    a, b = (s3.cat_file(d.removeprefix("s3://")) for d in dests)
    assert_same_archive(a, b)
    assert_same_ranks(*dests)
    ra, rb = (
        LineageRecord.from_json(s3.cat_file(f"{d}.lineage.json".removeprefix("s3://")))
        for d in dests
    )
    return a, b, ra, rb
