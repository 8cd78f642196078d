"""A ``convert`` run SIGKILLed mid-upload, then a rerun: no incomplete multipart upload and no
work files are left, and the ``.nemo`` equals an uninterrupted run's (``lineage.json`` aside).

The killed run's hold on its destination (a Prefect concurrency lease) lapses by itself; the
rerun waits for that, aborts the upload the killed run left, and removes its package folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flow_helpers import assert_same_archive

from flows.convert import convert_vit

REPO = Path(__file__).resolve().parents[2]
PART = 5 << 20


def _uploads(s3, key: str) -> list[dict]:
    reply = s3.call_s3("list_multipart_uploads", Bucket="ckpt-models", Prefix=key)
    return [u for u in reply.get("Uploads", []) if u["Key"] == key]


def _killed_once_parts_are_stored(s3, key: str, code: str, *args: str) -> int:
    """Run ``code`` in a new process (the test's Prefect API, this checkout) and SIGKILL it as
    soon as the multipart upload to ``key`` has a stored part; its pid."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    sent = False
    while time.monotonic() < deadline and proc.poll() is None and not sent:
        for upload in _uploads(s3, key):
            parts = s3.call_s3(
                "list_parts", Bucket="ckpt-models", Key=key, UploadId=upload["UploadId"]
            )
            sent = bool(parts.get("Parts"))
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and sent, "the run was not caught mid-upload"
    return proc.pid


@pytest.mark.usefixtures("prefect_api")
def test_a_run_killed_mid_upload_then_a_rerun(s3, work_dir, prefix, sample_factory, monkeypatch):
    monkeypatch.setenv("CKPT_UPLOAD_CHUNK_BYTES", str(PART))
    monkeypatch.setenv("CKPT_DESTINATION_WAIT", "240")  # fail, not hang, if the hold stayed
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2, hidden=512, layers=4, heads=8, ffn=2048, img=64, patch=8)
    key = f"{prefix}/vit.nemo"
    dest = f"s3://ckpt-models/{key}"
    ref = f"s3://ckpt-models/{prefix}/ref.nemo"
    convert_vit(source=src, destination=ref, target_tp=1)
    os.makedirs(work_dir, exist_ok=True)
    assert os.listdir(work_dir) == []

    code = (
        "import sys\n"
        "from flows.convert import convert_vit\n"
        "convert_vit(source=sys.argv[1], destination=sys.argv[2], target_tp=1)\n"
    )
    _killed_once_parts_are_stored(s3, key, code, src, dest)
    assert _uploads(s3, key) and not s3.exists(f"ckpt-models/{key}")  # what the killed run left
    assert any(n.startswith("package-") for n in os.listdir(work_dir))

    state = convert_vit(source=src, destination=dest, target_tp=1, return_state=True)
    assert state.is_completed(), state
    assert _uploads(s3, key) == []
    assert os.listdir(work_dir) == []
    assert_same_archive(
        s3.cat_file(ref.removeprefix("s3://")), s3.cat_file(dest.removeprefix("s3://"))
    )


@pytest.mark.usefixtures("prefect_api")
def test_a_run_killed_while_its_workers_assemble_then_a_rerun(
    s3, work_dir, prefix, sample_factory, monkeypatch, small_parts
):
    """The workers write the archive in place (``runner``); the run is killed once parts are
    stored: the rerun aborts that upload, the killed run's piece folders go, the output is the
    uninterrupted run's."""
    import tempfile

    monkeypatch.setenv("CKPT_DESTINATION_WAIT", "240")
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2, hidden=512, layers=4, heads=8, ffn=2048, img=64, patch=8)
    key = f"{prefix}/vit.nemo"
    dest = f"s3://ckpt-models/{key}"
    ref = f"s3://ckpt-models/{prefix}/ref.nemo"
    convert_vit(source=src, destination=ref, target_tp=2, target_pp=2)

    code = (
        "import sys\n"
        "from flows.convert import convert_vit\n"
        "convert_vit(source=sys.argv[1], destination=sys.argv[2], target_tp=2, target_pp=2,\n"
        "            runner='threads:1')\n"
    )
    pid = _killed_once_parts_are_stored(s3, key, code, src, dest)
    assert _uploads(s3, key) and not s3.exists(f"ckpt-models/{key}")  # what the killed run left
    pieces = Path(tempfile.gettempdir()).glob(f"ckpt-piece-{pid}-*")

    state = convert_vit(
        source=src, destination=dest, target_tp=2, target_pp=2, runner="threads:1",
        return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state
    assert _uploads(s3, key) == []
    assert list(pieces) == []  # the killed run's spool folders were swept by the rerun's
    assert os.listdir(work_dir) == []
    assert_same_archive(
        s3.cat_file(ref.removeprefix("s3://")), s3.cat_file(dest.removeprefix("s3://"))
    )
