"""Local faults: a full disk, a run killed mid-write, two runs racing for one destination.

The ``ckpt`` processes here are real subprocesses. Where a run must be caught mid-write, a wrapper
makes its writes small (4 KiB ``os.write`` calls, no kernel copy) and holds them once a given
number of bytes is written, then runs the unchanged CLI: the process and its files are the real
ones, and the test kills it (or lets it go) at exactly that point.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hostile_helpers import ROOT, ckpt_proc, copy, run_cli

from ckptcore.output import destination_lock

SLOW_CKPT = textwrap.dedent(
    """
    import os, sys, time
    real_write = os.write
    stall_at = int(os.environ.get("HOSTILE_STALL_AT", "-1"))
    release = os.environ.get("HOSTILE_RELEASE", "")
    written = 0
    def small_write(fd, data):
        global written
        if ".tmp-" not in os.readlink(f"/proc/self/fd/{fd}"):  # not the work file
            return real_write(fd, data)
        if 0 <= stall_at <= written:  # hold here until released (or killed)
            while not (release and os.path.exists(release)):
                time.sleep(0.005)
        n = real_write(fd, bytes(memoryview(data)[:4096]))
        written += n
        return n
    os.write = small_write
    if hasattr(os, "copy_file_range"):
        del os.copy_file_range  # every byte through os.write
    from ckptcore.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def held_ckpt(*args, stall_at: int, release: Path | None = None) -> subprocess.Popen:
    """``ckpt ARGS`` that stops writing once ``stall_at`` bytes are written, until ``release``
    exists: a run caught mid-write, deterministically."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HOSTILE_STALL_AT=str(stall_at),
        HOSTILE_RELEASE=str(release or ""),
    )
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CKPT, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stalled(proc: subprocess.Popen, out: Path, size: int):
    """A predicate: the run's work file has reached ``size`` bytes (the run is still alive)."""

    def check() -> bool:
        assert proc.poll() is None, proc.communicate()
        tmp = [n for n in work_files(out) if ".tmp-" in n]
        return bool(tmp) and os.path.getsize(out.parent / tmp[0]) >= size

    return check


def work_files(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def wait_for(predicate, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


@pytest.fixture
def reference(templates, tmp_path) -> bytes:
    """The bytes of an uninterrupted run of ``reshard tp1.nemo --target-tp 2``."""
    dest = tmp_path / "reference.nemo"
    rc, _, err = run_cli("reshard", templates.nemo_tp1, dest, "--target-tp", "2")
    assert rc == 0, err
    return dest.read_bytes()


# --------------------------------------------------------------------------- a full disk


def _fsize_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_while_writing(templates, out):
    """RLIMIT_FSIZE makes the kernel refuse the write past 64 KiB (EFBIG), as a full disk would."""
    proc = ckpt_proc(
        "reshard", templates.nemo_tp1, out, "--target-tp", "2", preexec_fn=_fsize_limit(64 << 10)
    )
    assert proc.stderr == f"ckpt: error: {out}: cannot write: File too large\n"
    assert proc.returncode == 74  # the machine failed, not the input
    assert os.listdir(out.parent) == []


def test_file_size_limit_while_staging(templates, out):
    """With --workers 2 the rank files are staged in a temporary folder first: that write fails,
    and the error names the destination and the staging folder."""
    proc = ckpt_proc(
        "reshard",
        templates.nemo_tp1,
        out,
        "--target-tp",
        "2",
        "--workers",
        "2",
        preexec_fn=_fsize_limit(64 << 10),
    )
    assert re.fullmatch(
        rf"ckpt: error: {re.escape(str(out))}: cannot write the staging folder \S+: File too large\n",
        proc.stderr,
    ), proc.stderr
    assert proc.returncode == 74  # the machine failed, not the input
    assert os.listdir(out.parent) == []


def test_no_space_left_on_device(templates, out, monkeypatch):
    """ENOSPC injected at the OS layer (os.write, copy_file_range) for files under out/."""
    real_write = os.write
    budget = [100 << 10]

    def full_disk(fd: int, data) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(out.parent)):
            if budget[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_write(fd, bytes(memoryview(data)[: budget[0]]))
            budget[0] -= n
            return n
        return real_write(fd, data)

    def no_copy(*args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))  # force the write path

    monkeypatch.setattr(os, "write", full_disk)
    monkeypatch.setattr(os, "copy_file_range", no_copy, raising=False)
    rc, _, err = run_cli("reshard", templates.nemo_tp1, out, "--target-tp", "2")
    assert err == f"ckpt: error: {out}: cannot write: No space left on device\n"
    assert rc == 74  # the machine failed, not the input
    assert os.listdir(out.parent) == []


# --------------------------------------------------------------------------- killed runs


@pytest.mark.parametrize("at", [0.0, 0.3, 0.9])
def test_killed_run_then_rerun_gives_the_same_bytes(templates, out, reference, at):
    """SIGKILL once the work file holds ``at`` of the output; the rerun cleans up after it and
    writes exactly what an uninterrupted run writes."""
    size = int(at * len(reference))
    proc = held_ckpt(
        "reshard", templates.nemo_tp1, out, "--target-tp", "2", "--overwrite", stall_at=size
    )
    wait_for(stalled(proc, out, size))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left = work_files(out)
    assert any(".tmp-" in n for n in left), left  # a killed run leaves its work file...
    assert not out.exists()
    rc, _, err = run_cli("reshard", templates.nemo_tp1, out, "--target-tp", "2", "--overwrite")
    assert rc == 0, err
    assert work_files(out) == []  # ...which the next run removes
    assert out.read_bytes() == reference


def test_killed_before_writing_leaves_nothing(templates, out, reference):
    proc = held_ckpt("reshard", templates.nemo_tp1, out, "--target-tp", "2", stall_at=0)
    time.sleep(0.3)  # still starting up
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists()
    rc, _, err = run_cli("reshard", templates.nemo_tp1, out, "--target-tp", "2")
    assert rc == 0, err
    assert out.read_bytes() == reference and work_files(out) == []


def test_killed_overwrite_keeps_the_old_destination(templates, out, reference):
    out.write_bytes(b"the previous version")
    half = len(reference) // 2
    proc = held_ckpt(
        "reshard", templates.nemo_tp1, out, "--target-tp", "2", "--overwrite", stall_at=half
    )
    wait_for(stalled(proc, out, half))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert out.read_bytes() == b"the previous version"


# --------------------------------------------------------------------------- racing runs


def test_second_run_is_refused_while_the_first_writes(templates, tmp_path, out, reference):
    release = tmp_path / "release"
    half = len(reference) // 2
    first = held_ckpt(
        "reshard", templates.nemo_tp1, out, "--target-tp", "2", stall_at=half, release=release
    )
    wait_for(stalled(first, out, half))
    before = work_files(out)
    rc, _, err = run_cli("reshard", templates.nemo_tp1, out, "--target-tp", "2", "--overwrite")
    lock = out.parent / f".{out.name}.lock"
    assert err == (
        f"ckpt: error: {out}: another run is writing this destination (lock {lock} held by "
        f"process {first.pid}); wait for it to finish or choose another destination\n"
    )
    assert rc == 2
    assert work_files(out) == before  # the first run's work file was not touched
    release.touch()
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert out.read_bytes() == reference and work_files(out) == []


def test_lock_held_in_this_process(templates, out):
    with destination_lock(str(out)) as lock:
        rc, _, err = run_cli("reshard", templates.nemo_tp1, out, "--target-tp", "2")
        assert rc == 2
        assert err == (
            f"ckpt: error: {out}: another run is writing this destination (lock {lock} held by "
            f"process {os.getpid()}); wait for it to finish or choose another destination\n"
        )
    assert work_files(out) == []


def test_two_runs_at_once_never_interleave(templates, tmp_path, out, reference):
    """Both start together: each either completes or is refused; the result is one whole run."""
    src = copy(templates.nemo_tp1, tmp_path / "src.nemo")
    args = ["reshard", src, out, "--target-tp", "2", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ckptcore.cli", *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in procs]
    ok = [r for r in results if r[3] == 0]
    assert ok, results
    lock = out.parent / f".{out.name}.lock"
    for pid, _, stderr, rc in results:
        if rc != 0:
            other = next(r[0] for r in results if r[0] != pid)
            assert stderr == (
                f"ckpt: error: {out}: another run is writing this destination (lock {lock} "
                f"held by process {other}); wait for it to finish or choose another destination\n"
            )
    assert out.read_bytes() == reference and work_files(out) == []
