"""What ``ckpt`` answers with: its version, and an exit status that tells the failures apart."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from real_nemo import FIXTURES

import ckptcore
import ckptcore.api
from ckptcore.cli import EXIT_STATUSES, main
from ckptcore.errors import CkptError, MachineError
from ckptcore.output import atomic_output


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptcore", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_python_dash_m() -> None:
    proc = _module("--version")
    assert proc.returncode == 0 and proc.stdout == f"ckpt {ckptcore.__version__}\n"
    proc = _module("inspect", str(FIXTURES / "tiny_vit_tp2.nemo"))
    assert proc.returncode == 0 and "TP=2" in proc.stdout


def test_help_lists_every_exit_status() -> None:
    proc = _module("--help")
    assert {0, 1, 2, 70, 74, 75, 130, 141} == set(EXIT_STATUSES)
    for code, meaning in EXIT_STATUSES.items():
        assert f"  {code:<4}{meaning}" in proc.stdout


def test_a_bug_exits_70_with_its_traceback(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("an internal inconsistency")

    monkeypatch.setattr(ckptcore.api, "inspect", broken)
    assert main(["inspect", str(FIXTURES / "tiny_vit_tp1.nemo")]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal inconsistency" in err
    assert err.rstrip().splitlines()[-1].startswith("ckpt: internal error (a bug")


def test_verify_mismatch_and_machine_failure_differ(tmp_path, capsys) -> None:
    bf16 = tmp_path / "bf16.nemo"
    assert (
        main(["reshard", str(FIXTURES / "tiny_vit_tp1.nemo"), str(bf16), "--precision", "bf16"])
        == 0
    )
    assert main(["verify", str(FIXTURES / "tiny_vit_tp1.nemo"), str(bf16)]) == 1
    dest = tmp_path / "out.nemo"
    with pytest.raises(MachineError) as err:
        with atomic_output(str(dest), [], False):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"{dest}: cannot write: No space left on device"


def test_a_failing_input_is_named_not_the_destination(tmp_path) -> None:
    """A read of an input that fails while the destination is written names that input."""
    dest, source = tmp_path / "out.nemo", tmp_path / "rank.ckpt"
    with pytest.raises(MachineError) as err:
        with atomic_output(str(dest), [], False):
            raise OSError(errno.EIO, "Input/output error", str(source))
    assert str(err.value) == f"{source}: failed while writing {dest}: Input/output error"
    with pytest.raises(CkptError) as err:  # gone meanwhile: the request, not the machine
        with atomic_output(str(dest), [], False):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(source))
    assert not isinstance(err.value, MachineError)
    assert str(err.value).startswith(f"{source}: failed while writing {dest}")
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_goes_away_is_no_error() -> None:
    """``ckpt plan vit-70b --estimate --json | head -c 1``: the reader closes the pipe long before
    the 600 KB are written (more than a pipe holds); no error line, status 141."""
    command = [sys.executable, "-m", "ckptcore", "plan", "vit-70b", "--estimate", "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=120), err) == (141, "")
