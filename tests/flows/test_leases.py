"""Runs over identical bytes share content-named work folders; none removes one another still
uses (``tasks.leases``), and a run that is gone does not keep one forever."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

import flows.convert
from flows.convert import convert_vit
from tasks import leases
from tasks.publish import clean_work


def _held_by_child(folder: str) -> subprocess.Popen:
    """Another process on this host holding ``folder``; it holds until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from tasks import leases
        leases.hold({folder!r})
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(flows.convert.__file__))),
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_another_process_holds_is_kept_until_it_is_gone(tmp_path) -> None:
    folder = tmp_path / "cache-abc"
    folder.mkdir()
    (folder / "entry").write_bytes(b"x")
    leases.hold(str(folder))
    child = _held_by_child(str(folder))
    try:
        assert not leases.release(str(folder))  # the other process still holds it
        assert (folder / "entry").exists()
    finally:
        child.communicate("")  # the other process ends without releasing
    leases.hold(str(folder))
    assert leases.release(str(folder))  # its hold died with it
    assert os.listdir(tmp_path) == []  # the folder and its holders are gone


def test_runs_in_one_process_are_told_apart(tmp_path, monkeypatch) -> None:
    folder = str(tmp_path / "fetch-abc")
    os.makedirs(folder)
    monkeypatch.setattr(leases, "_run_id", lambda: "run-a")
    leases.hold(folder)
    monkeypatch.setattr(leases, "_run_id", lambda: "run-b")
    with leases.run_holds():
        leases.hold(folder)
        monkeypatch.setattr(leases, "_run_id", lambda: "run-a")
        assert not leases.release(folder)  # run b still uses it
        monkeypatch.setattr(leases, "_run_id", lambda: "run-b")
    # run b ended (failed, say) without cleaning: its folder stays, its hold does not
    assert os.path.isdir(folder)
    monkeypatch.setattr(leases, "_run_id", lambda: "run-c")
    assert clean_work.fn(str(tmp_path), [folder]) == [folder]
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("prefect_api")
def test_identical_checkpoints_converted_at_once(s3, work_dir, prefix, sample_factory, monkeypatch):
    """The same checkpoint under two prefixes, converted at the same time in one process: run B
    is held at verify (which reads the range cache both runs share) until run A has finished
    and cleaned up. Both complete, and the holds leave nothing behind: the work folder is empty
    after the second. (A range cache removed under a run is refilled from the source; the
    folder that must not go is the downloaded partition, next test.)"""
    sample = sample_factory(None, None, tp=2)
    for name in ("a", "b"):
        s3.put(sample.local + "/", f"ckpt-training/{prefix}/{name}/checkpoints/", recursive=True)
    a_done = threading.Event()
    real_verify = flows.convert.verify_output

    def verify_after_a(fetched, packaged, *args, **kwargs):
        if "/b/" in fetched.source:
            assert a_done.wait(300)
        return real_verify(fetched, packaged, *args, **kwargs)

    monkeypatch.setattr(flows.convert, "verify_output", verify_after_a)
    states = {}

    def run(name: str) -> None:
        states[name] = convert_vit(
            source=f"s3://ckpt-training/{prefix}/{name}/checkpoints",
            destination=f"s3://ckpt-models/{prefix}/{name}.nemo",
            target_tp=1,
            return_state=True,
        )
        if name == "a":
            a_done.set()

    b = threading.Thread(target=run, args=("b",))
    b.start()
    run("a")
    b.join(600)
    assert states["a"].is_completed(), states["a"]
    assert states["b"].is_completed(), states["b"]
    assert s3.exists(f"ckpt-models/{prefix}/b.nemo")
    assert os.listdir(work_dir) == []


def test_a_downloaded_partition_stays_while_another_run_packages_it(
    tmp_path, monkeypatch, sample_factory
) -> None:
    """As deployed, each run downloads its repartition run's output into a folder named by the
    partition's content: identical checkpoints give one folder. The first run to clean up
    leaves it to the other, which then removes it."""
    from ckptcore.api import describe_source, locate_checkpoint
    from tasks.convert import download_partition, write_partition

    sample = sample_factory(None, None, tp=2)
    work = str(tmp_path / "work")
    fetched = locate_checkpoint(describe_source(sample.local, "last"), work)
    scratch = str(tmp_path / "scratch")
    write_partition(fetched, 1, 1, "keep", scratch + "/handoff-a")
    write_partition(fetched, 1, 1, "keep", scratch + "/handoff-b")
    monkeypatch.setattr(leases, "_run_id", lambda: "run-a")
    a = download_partition.fn(scratch + "/handoff-a", work)
    monkeypatch.setattr(leases, "_run_id", lambda: "run-b")
    b = download_partition.fn(scratch + "/handoff-b", work)
    assert a.url == b.url
    monkeypatch.setattr(leases, "_run_id", lambda: "run-a")
    assert clean_work.fn(work, [a.url]) == []  # run b still packages from it
    assert all(os.path.getsize(path) > 0 for path in b.members.values())
    monkeypatch.setattr(leases, "_run_id", lambda: "run-b")
    assert clean_work.fn(work, [b.url]) == [b.url]
    assert os.listdir(work) == []
