"""The ckpt command: bad input ends with one clear line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ckptcore.sample import vit_config, write_nemo, write_training_checkpoint


def ckpt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptcore.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ckpt: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_bad_input(kind: str, root: Path) -> tuple[Path, tuple[str, ...]]:
    cfg = vit_config("tiny")
    if kind == "missing_rank":
        folder = root / "ck"
        name, _ = write_training_checkpoint(str(folder), cfg, tp=2)
        os.remove(folder / "mp_rank_01" / name)
        return folder, (str(folder), "missing rank(s) mp_rank_01")
    if kind == "two_last":
        folder = root / "ck"
        write_training_checkpoint(str(folder), cfg, step=1)
        write_training_checkpoint(str(folder), cfg, step=2)
        return folder, (str(folder), "2 checkpoints match 'last'")
    if kind == "truncated_ckpt":
        folder = root / "ck"
        name, _ = write_training_checkpoint(str(folder), cfg)
        path = folder / name
        path.write_bytes(path.read_bytes()[:5000])
        return folder, (str(path), "truncated")
    if kind == "non_zip_ckpt":
        folder = root / "ck"
        folder.mkdir()
        path = folder / "model--step=1-last.ckpt"
        path.write_bytes(b"this is not a zip file" * 10)
        return folder, (str(path), "not a torch checkpoint")
    if kind == "tar_escape":
        path = root / "evil.nemo"
        _tar_with(path, {"../escape.txt": b"x", "model_config.yaml": b"hidden_size: 1\n"})
        return path, (str(path), "path escapes the archive")
    if kind == "not_a_checkpoint":
        path = root / "notes.nemo"
        path.write_text("just some text\n")
        return path, (str(path), "not a valid .nemo")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing_rank",
        "two_last",
        "truncated_ckpt",
        "non_zip_ckpt",
        "tar_escape",
        "not_a_checkpoint",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, kind: str) -> None:
    src, fragments = make_bad_input(kind, tmp_path)
    out = tmp_path / "out" / "model.nemo"
    out.parent.mkdir()
    proc = ckpt("convert", str(src), str(out))
    _assert_user_error(proc, *fragments)
    assert list(out.parent.iterdir()) == []
    assert not (tmp_path.parent / "escape.txt").exists()


def test_inspect_and_verify(tmp_path) -> None:
    src = tmp_path / "a.nemo"
    write_nemo(str(src), vit_config("tiny"))
    proc = ckpt("inspect", str(src))
    assert proc.returncode == 0 and "TP=1 PP=1" in proc.stdout
    assert ckpt("reshard", str(src), str(tmp_path / "b.nemo"), "--target-tp", "2").returncode == 0
    proc = ckpt("verify", str(src), str(tmp_path / "b.nemo"))
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout
    other = tmp_path / "c.nemo"
    write_nemo(str(other), vit_config("tiny"), seed=9)
    proc = ckpt("verify", str(src), str(other))
    assert proc.returncode == 1 and proc.stdout.startswith("MISMATCH")


def test_existing_destination_and_same_path(tmp_path) -> None:
    src = tmp_path / "a.nemo"
    write_nemo(str(src), vit_config("tiny"))
    before = src.read_bytes()
    _assert_user_error(
        ckpt("reshard", str(src), str(src), "--target-tp", "2"), "destination is the source"
    )
    dest = tmp_path / "b.nemo"
    dest.write_bytes(b"keep me")
    _assert_user_error(ckpt("reshard", str(src), str(dest)), "already exists", "--overwrite")
    assert dest.read_bytes() == b"keep me" and src.read_bytes() == before
    assert ckpt("reshard", str(src), str(dest), "--overwrite").returncode == 0


def test_unknown_precision(tmp_path) -> None:
    src = tmp_path / "a.nemo"
    write_nemo(str(src), vit_config("tiny"))
    _assert_user_error(
        ckpt("reshard", str(src), str(tmp_path / "b.nemo"), "--precision", "fp8"),
        "unknown precision",
    )


def test_help_explains_every_command() -> None:
    proc = ckpt("--help")
    for command in ("inspect", "convert", "reshard", "verify", "plan", "import-hf", "export-hf"):
        assert command in proc.stdout
        sub = ckpt(command, "--help")
        assert sub.returncode == 0 and "example:" in sub.stdout
