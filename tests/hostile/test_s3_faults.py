"""Object storage that fails mid-transfer: 5xx answers and dropped connections while downloading
the source and uploading the result, through ``ckpt`` with s3:// URLs (moto behind a proxy).

Either the command succeeds and the object is byte-identical to a local conversion, or it ends
with one line, a non-zero exit and nothing at the destination (no object, no pending upload).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hostile_helpers import run_cli
from s3_faults import FaultProxy

BUCKET = "hostile"
INTERNAL = "We encountered an internal error. Please try again."


def _clear() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def impatient(proxy, monkeypatch):
    """Fewer retries for faults that never pass: botocore tries once, s3fs twice (it nests its
    retries, so a dropped read would otherwise take 25 attempts and ~10 s to give up)."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    _clear()


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def bucket(moto_url, templates, tmp_path_factory):
    """The bucket with the templates uploaded, and the local reference conversions."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(templates.nemo_tp1), BUCKET, "tp1.nemo")
    for path in sorted(templates.train_tp2.rglob("*.ckpt")):
        s3.upload_file(str(path), BUCKET, f"train/{path.relative_to(templates.train_tp2)}")
    ref = tmp_path_factory.mktemp("reference")
    expected = {}
    for name, args in (
        ("reshard", ["reshard", templates.nemo_tp1, ref / "r.nemo", "--target-tp", "2"]),
        ("convert", ["convert", templates.train_tp2, ref / "c.nemo", "--target-tp", "1"]),
    ):
        rc, _, err = run_cli(*args)
        assert rc == 0, err
        expected[name] = Path(args[2]).read_bytes()
    return s3, expected


@pytest.fixture
def proxy(moto_url, bucket, s3_env, monkeypatch):
    p = FaultProxy(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    _clear()
    yield p
    _clear()
    p.stop()


def _object(bucket, key: str) -> bytes | None:
    s3, _ = bucket
    try:
        return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def _no_pending_uploads(bucket) -> bool:
    s3, _ = bucket
    return not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- downloads


def test_download_faults_that_pass_are_retried(proxy, bucket, out):
    """A 500, a dropped connection and a body cut in half, one after the other on the source's
    GETs: the client retries each, the result is byte-identical to the local conversion."""
    faults = [
        proxy.fail("GET", f"/{BUCKET}/tp1.nemo", mode, count=1) for mode in ("500", "drop", "cut")
    ]
    rc, _, err = run_cli("reshard", f"s3://{BUCKET}/tp1.nemo", out, "--target-tp", "2")
    assert rc == 0, err
    assert [len(f.hits) for f in faults] == [1, 1, 1]
    assert _sha(out.read_bytes()) == _sha(bucket[1]["reshard"])


def test_download_faults_of_a_training_folder_are_retried(proxy, bucket, out):
    fault = proxy.fail("GET", f"/{BUCKET}/train/mp_rank_01/", "cut", count=1)
    rc, _, err = run_cli("convert", f"s3://{BUCKET}/train", out, "--target-tp", "1")
    assert rc == 0, err
    assert len(fault.hits) == 1
    assert _sha(out.read_bytes()) == _sha(bucket[1]["convert"])


def test_download_that_keeps_failing_is_a_clean_error(proxy, bucket, out, impatient):
    proxy.fail("GET", f"/{BUCKET}/tp1.nemo", "500")
    rc, stdout, err = run_cli("reshard", f"s3://{BUCKET}/tp1.nemo", out, "--target-tp", "2")
    assert (rc, stdout) == (75, "")
    assert err == (
        f"ckpt: error: s3://{BUCKET}/tp1.nemo: reading bytes 0..2 failed: {INTERNAL} "
        "(storage failure; try again)\n"
    )
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_download_dropping_mid_conversion_is_a_clean_error(proxy, bucket, out, impatient):
    """Opening the archive reads fine; every read of the tensors after that drops."""
    from ckptcore.sources import open_checkpoint

    with open_checkpoint(f"s3://{BUCKET}/tp1.nemo"):
        opening = sum(1 for m, p in proxy.requests if (m, p) == ("GET", f"/{BUCKET}/tp1.nemo"))
    assert opening >= 2
    proxy.clear()
    _clear()
    proxy.fail("GET", f"/{BUCKET}/tp1.nemo", "drop", skip=opening)
    rc, _, err = run_cli("reshard", f"s3://{BUCKET}/tp1.nemo", out, "--target-tp", "2")
    assert rc == 75
    err = err.replace(proxy.url, "<proxy>")
    prefix = f"ckpt: error: s3://{BUCKET}/tp1.nemo: reading bytes "
    suffix = (
        " failed: Connection was closed before we received a valid response from endpoint URL: "
        f'"<proxy>/{BUCKET}/tp1.nemo". (storage failure; try again)\n'
    )
    assert err.startswith(prefix) and err.endswith(suffix), err
    assert err.count("\n") == 1
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_listing_that_keeps_failing_is_a_clean_error(proxy, bucket, out, impatient):
    proxy.fail("GET", f"/{BUCKET}?list-type=2", "500")
    proxy.fail("HEAD", f"/{BUCKET}/train", "500")
    rc, _, err = run_cli("convert", f"s3://{BUCKET}/train", out)
    assert rc == 75
    assert err == (
        f"ckpt: error: s3://{BUCKET}/train: cannot access: {INTERNAL} (storage failure; try again)\n"
    )
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("mode", ["500", "drop", "lost"])
def test_upload_faults_that_pass_are_retried(proxy, bucket, mode):
    dest = f"retried-{mode}.nemo"
    fault = proxy.fail("PUT", f"/{BUCKET}/{dest}", mode, count=1)  # one failed attempt
    rc, _, err = run_cli(
        "reshard", f"s3://{BUCKET}/tp1.nemo", f"s3://{BUCKET}/{dest}", "--target-tp", "2"
    )
    assert rc == 0, err
    assert len(fault.hits) == 1
    assert _sha(_object(bucket, dest)) == _sha(bucket[1]["reshard"])
    assert _no_pending_uploads(bucket)


def test_upload_that_keeps_failing_leaves_nothing(proxy, bucket, templates, impatient):
    dest = "never.nemo"
    proxy.fail("PUT", f"/{BUCKET}/{dest}", "500")
    proxy.fail("POST", f"/{BUCKET}/{dest}", "500")
    rc, stdout, err = run_cli(
        "reshard", templates.nemo_tp1, f"s3://{BUCKET}/{dest}", "--target-tp", "2"
    )
    assert (
        err
        == f"ckpt: error: s3://{BUCKET}/{dest}: upload failed: {INTERNAL} (storage failure; try again)\n"
    ), err
    assert rc == 75 and stdout == ""
    assert _object(bucket, dest) is None
    assert _no_pending_uploads(bucket)


def test_s3_to_s3_with_faults_on_both_sides(proxy, bucket):
    proxy.fail("GET", f"/{BUCKET}/tp1.nemo", "cut", count=1)
    proxy.fail("GET", f"/{BUCKET}/tp1.nemo", "500", count=1)
    proxy.fail("PUT", f"/{BUCKET}/both.nemo", "500", count=1)
    rc, _, err = run_cli(
        "reshard", f"s3://{BUCKET}/tp1.nemo", f"s3://{BUCKET}/both.nemo", "--target-tp", "2"
    )
    assert rc == 0, err
    assert _sha(_object(bucket, "both.nemo")) == _sha(bucket[1]["reshard"])


def test_existing_s3_destination_is_refused(proxy, bucket):
    s3, _ = bucket
    s3.put_object(Bucket=BUCKET, Key="taken.nemo", Body=b"keep me")
    rc, _, err = run_cli("reshard", f"s3://{BUCKET}/tp1.nemo", f"s3://{BUCKET}/taken.nemo")
    assert rc == 2
    assert err == (
        f"ckpt: error: s3://{BUCKET}/taken.nemo: destination already exists "
        "(pass --overwrite to replace it)\n"
    )
    assert _object(bucket, "taken.nemo") == b"keep me"
