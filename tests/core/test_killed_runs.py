"""A ``ckpt convert --workers N`` killed mid-write leaves its staging folder; the next run
removes it (its process is gone), and its output equals an uninterrupted run's byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_runner import run_cli

from ckptcore.output import STAGE_PREFIX, remove_orphaned_stages, staging_folder
from ckptcore.sample import vit_config, write_training_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_the_stages_of_gone_processes_are_removed(tmp_path) -> None:
    dead = _dead_pid()
    orphan = tmp_path / f"{STAGE_PREFIX}{dead}-abc"
    orphan.mkdir()
    (orphan / "mp_rank_00").mkdir()
    upload = tmp_path / f"{STAGE_PREFIX}{dead}-upload-x.tmp"
    upload.write_bytes(b"half a .nemo")
    live = tmp_path / f"{STAGE_PREFIX}{os.getppid()}-def"
    live.mkdir()
    other = tmp_path / "ckpt-stage-notapid"
    other.mkdir()
    removed = remove_orphaned_stages(str(tmp_path))
    assert sorted(removed) == sorted([str(orphan), str(upload)])
    assert live.exists() and other.exists() and not orphan.exists() and not upload.exists()


def test_a_staging_folder_is_named_by_its_process_and_removed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with staging_folder() as stage:
        assert os.path.basename(stage).startswith(f"{STAGE_PREFIX}{os.getpid()}-")
        Path(stage, "x").write_bytes(b"1")
    assert not os.path.exists(stage)


def test_a_killed_workers_run_is_cleaned_up_by_the_next_one(tmp_path) -> None:
    src = tmp_path / "run" / "checkpoints"
    write_training_checkpoint(
        str(src), vit_config("base", layers=6), optimizer=False
    )  # ~170 MB of weights: the write takes long enough to be killed in the middle
    ref = tmp_path / "ref.nemo"
    assert run_cli("convert", src, ref, "--target-tp", "2")[0] == 0
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out" / "vit.nemo"
    cmd = [sys.executable, "-m", "ckptcore", "convert", str(src), str(out), "--target-tp", "2"]
    cmd += ["--workers", "2"]  # two rank files written in parallel to a staging folder
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        stages = [p for p in tmp.iterdir() if p.name.startswith(STAGE_PREFIX)]
        if stages and any(f for _, _, fs in os.walk(stages[0]) for f in fs):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-write"
    assert any(p.name.startswith(STAGE_PREFIX) for p in tmp.iterdir())  # left behind
    assert not out.exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in tmp.iterdir()] == []  # the killed run's staging folder went too
    assert sorted(p.name for p in out.parent.iterdir()) == ["vit.nemo"]  # no work file left
    assert out.read_bytes() == ref.read_bytes()
