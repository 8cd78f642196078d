"""Work items: independent per target file, with exact byte ranges; estimates at 70B scale."""

from __future__ import annotations

import json
import subprocess
import sys

from ckptcore.api import plan_conversion
from ckptcore.sample import shape_only_checkpoint, vit_config, write_nemo
from ckptcore.sources import open_checkpoint
from ckptcore.workplan import estimate, work_items


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
