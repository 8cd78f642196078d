"""Work items: independent per target file, with exact byte ranges; estimates at 70B scale."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

from ckptcore.api import convert, dump_config, plan_conversion
from ckptcore.engine import file_layout
from ckptcore.formats.nemo import CONFIG_NAME, archive_layout, write_member_at
from ckptcore.sample import shape_only_checkpoint, vit_config, write_nemo
from ckptcore.sources import open_checkpoint
from ckptcore.workplan import estimate, work_items, write_work_item_in_place


def test_items_read_exactly_the_source_bytes(tmp_path) -> None:
    src = str(tmp_path / "a.nemo")
    write_nemo(src, vit_config("tiny", layers=4), tp=2)
    with open_checkpoint(src) as ck:
        plan = plan_conversion(ck, 1, 2)
        items = work_items(ck, plan)
        weights = sum(tt.nbytes for fp in plan.files for tt in fp.tensors)
    assert [i.path for i in items] == [
        "tp_rank_00_pp_rank_000/model_weights.ckpt",
        "tp_rank_00_pp_rank_001/model_weights.ckpt",
    ]
    # merging TP=2 shards reads every weight byte once, plus the replica checks of rank 1's copies
    total = sum(i.read_bytes for i in items)
    assert weights <= total <= 1.1 * weights
    for item in items:
        assert all(name.endswith("a.nemo") for name, _, _ in item.reads)
        json.dumps(item.to_dict())


def test_estimate_at_70b_scale() -> None:
    ck = shape_only_checkpoint("vit-70b", tp=8, pp=4)
    plan = plan_conversion(ck, 4, 8)
    items = work_items(ck, plan, with_ranges=False)
    assert len(items) == 32
    total = sum(i.write_bytes for i in items)
    assert 100e9 < total < 140e9  # ~59 B parameters in bf16
    one, many = estimate(items, 1, 1.0), estimate(items, 16, 1.0)
    assert many["seconds"] < one["seconds"] / 10


def test_cli_plan_estimate() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckptcore.cli", "plan", "vit-405b", "--estimate", "--source-tp", "8", "--source-pp", "6", "--target-tp", "16", "--target-pp", "9", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["items"]) == 16 * 9 and [e["workers"] for e in out["estimates"]] == [
        1,
        4,
        16,
        64,
    ]


def test_items_written_in_place_make_the_one_pass_archive(tmp_path) -> None:
    """Each work item writes its rank file straight to its place in the final archive (a
    pre-sized file, another process for one of them); with the config member written beside
    them, the file equals ``ckpt convert``'s archive byte for byte."""
    src = str(tmp_path / "a.nemo")
    write_nemo(src, vit_config("tiny", layers=4), tp=2)
    ref = tmp_path / "ref.nemo"
    convert(src, str(ref), target_tp=1, target_pp=2)
    with open_checkpoint(src) as ck:
        plan = plan_conversion(ck, 1, 2)
    config = dump_config(plan.config)
    sizes = {CONFIG_NAME: len(config), **{fp.path: file_layout(fp).size for fp in plan.files}}
    placements, total = archive_layout(sizes)
    at = {p.rel: p for p in placements if p.rel}
    archive = tmp_path / "in-place.nemo"
    with open(archive, "wb") as f:
        f.truncate(total)
    first, *rest = plan.files
    code = (
        "import pickle, sys\n"
        "from ckptcore.workplan import write_work_item_in_place\n"
        "args = pickle.loads(sys.stdin.buffer.read())\n"
        "write_work_item_in_place(*args)\n"
    )
    payload = pickle.dumps((src, "last", first, str(archive), at[first.path]))
    subprocess.run([sys.executable, "-c", code], input=payload, check=True)
    for fp in reversed(rest):
        write_work_item_in_place(src, "last", fp, str(archive), at[fp.path])
    fd = os.open(archive, os.O_RDWR)
    try:
        write_member_at(fd, at[CONFIG_NAME], config)
        for p in placements:
            if p.rel is None:  # the folders' headers
                write_member_at(fd, p, b"")
    finally:
        os.close(fd)
    assert archive.read_bytes() == ref.read_bytes()
