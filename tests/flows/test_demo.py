"""``python -m flows.demo`` (what ``make demo`` runs) in its own process, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_converts_restores_and_reports(tmp_path):
    out = tmp_path / "demo-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CKPT_"))}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.demo", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 180, f"the demo took {seconds:.0f}s (budget: 3 minutes)"
    text = proc.stdout
    assert "restored .nemo vs source: max |logit diff|" in text and ": OK" in text
    assert "TP=2 PP=1 -> TP=1 PP=1" in text
    nemo = out / "models" / "vit-tp1.nemo"
    record = json.loads((out / "models" / "vit-tp1.nemo.lineage.json").read_text())
    assert record["output"]["size_bytes"] == nemo.stat().st_size
    assert record["verify"]["passed"] is True
    assert (out / "prefect" / "prefect.db").exists()  # its own ephemeral database
    assert not any((out / "work").iterdir())  # work files cleaned up
