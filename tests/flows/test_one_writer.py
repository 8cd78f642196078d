"""One writer per destination: runs for the same destination take turns on a Prefect global
concurrency limit named by the destination (``tasks.writers.one_writer``)."""

from __future__ import annotations

import os
import tarfile
import threading

import pytest
from prefect.client.orchestration import get_client

import flows.convert
from flows.convert import convert_vit
from tasks.writers import one_writer, writer_limit_name

pytestmark = pytest.mark.usefixtures("prefect_api")


def _message(state) -> str:
    with pytest.raises(Exception) as info:
        state.result()
    return str(info.value)


def test_a_second_run_for_a_destination_waits_for_the_first(
    tmp_path, work_dir, sample_factory, monkeypatch
):
    """Run B starts while run A is verifying the same destination: B waits for A's slot, then
    finds A's committed ``.nemo`` and stops saying so (it never overwrites A's, never fails
    half way)."""
    sample = sample_factory(None, None, tp=2)
    dest = str(tmp_path / "models" / "vit.nemo")
    a_verifying, b_started = threading.Event(), threading.Event()
    real_verify = flows.convert.verify_output

    def slow_first_verify(*args, **kwargs):
        if not a_verifying.is_set():
            a_verifying.set()
            assert b_started.wait(60)
            threading.Event().wait(3)  # B lists and reaches the destination meanwhile
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(flows.convert, "verify_output", slow_first_verify)
    states = {}

    def run(name: str) -> None:
        states[name] = convert_vit(
            source=sample.local, destination=dest, target_tp=1, return_state=True
        )

    a = threading.Thread(target=run, args=("a",))
    a.start()
    assert a_verifying.wait(120)
    b = threading.Thread(target=run, args=("b",))
    b.start()
    b_started.set()
    a.join(300)
    b.join(300)
    assert states["a"].is_completed(), states["a"]
    assert states["b"].is_failed()
    assert "destination already exists" in _message(states["b"])
    assert tarfile.is_tarfile(dest) and os.path.exists(dest + ".lineage.json")
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(writer_limit_name(dest))
    assert limit.limit == 1 and limit.active_slots == 0  # both runs let go of it


def test_a_run_that_waited_too_long_says_why(tmp_path, work_dir, sample_factory, monkeypatch):
    """``CKPT_DESTINATION_WAIT``: a run stops after that long, naming the destination and the
    limit, and writes nothing."""
    sample = sample_factory(None, None, tp=2)
    dest = str(tmp_path / "vit.nemo")
    monkeypatch.setenv("CKPT_DESTINATION_WAIT", "1")
    with one_writer(dest):  # another run writing it
        state = convert_vit(source=sample.local, destination=dest, return_state=True)
    assert state.is_failed()
    message = _message(state)
    assert dest in message and "another run has been writing this destination for 1 s" in message
    assert writer_limit_name(dest) in message and not os.path.exists(dest)


def _uploads(s3, bucket: str, prefix: str) -> list[str]:
    reply = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    return sorted(u["Key"] for u in reply.get("Uploads", []))


def test_the_next_run_aborts_what_a_killed_run_left_uploading(s3, work_dir, prefix, sample_factory):
    """A run killed mid-upload leaves an incomplete multipart upload (its parts kept by the
    store, never an object). The next run for that destination aborts it and completes; an
    upload to another key under the same prefix is not touched."""
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest_key = f"{prefix}/vit.nemo"
    sample_factory(s3, src, tp=2)
    for key in (dest_key, dest_key + ".lineage.json", f"{prefix}/vit.nemo.bak"):
        upload = s3.call_s3("create_multipart_upload", Bucket="ckpt-models", Key=key)
        s3.call_s3(
            "upload_part",
            Bucket="ckpt-models",
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=1,
            Body=b"x" * (5 << 20),
        )
    assert len(_uploads(s3, "ckpt-models", prefix)) == 3
    state = convert_vit(
        source=src, destination=f"s3://ckpt-models/{dest_key}", target_tp=1, return_state=True
    )
    assert state.is_completed(), state
    assert _uploads(s3, "ckpt-models", prefix) == [f"{prefix}/vit.nemo.bak"]
    with s3.open(f"ckpt-models/{dest_key}", "rb") as f:
        assert tarfile.is_tarfile(f)
