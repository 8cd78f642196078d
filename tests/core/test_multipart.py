"""Following a file while it is written: the sha256 reader and the S3 multipart upload (against
a real local S3 server), and ``write_nemo_file`` feeding them."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import zlib

import pytest
from helpers import local_s3

from ckptcore.api import nemo_members, package_nemo, plan_conversion, write_nemo_file
from ckptcore.errors import CkptError, StorageError
from ckptcore.follow import FollowingDigest
from ckptcore.multipart import MIN_PART_BYTES, FollowingUpload, part_size_for
from ckptcore.sample import vit_config, write_training_checkpoint
from ckptcore.sources import open_checkpoint

PART = MIN_PART_BYTES


@pytest.fixture(scope="module")
def s3():
    with local_s3("out") as fs:
        yield fs


def _pending(s3, key: str) -> list[dict]:
    return s3.call_s3("list_multipart_uploads", Bucket="out", Prefix=key).get("Uploads", [])


def _write_slowly(path: str, data: bytes, followers, step: int, pause=None) -> None:
    """Append ``data`` in ``step``-byte writes, telling the followers after each."""
    with open(path, "r+b") as f:
        for at in range(0, len(data), step):
            f.write(data[at : at + step])
            f.flush()
            for follower in followers:
                follower.written(f.tell())
            if pause is not None:
                pause(f.tell())
    for follower in followers:
        follower.finish(len(data))


def test_parts_go_up_while_the_file_is_written_and_commit_makes_the_object(s3, tmp_path):
    path = str(tmp_path / "growing.bin")
    data = os.urandom(3 * PART + 12345)
    open(path, "wb").close()
    upload = FollowingUpload(path, "s3://out/grow.bin", PART, concurrency=2)
    digest = FollowingDigest(path)
    sent_before_end: list[int] = []

    def pause(position: int) -> None:
        if position > PART and not sent_before_end:  # part 1 is whole: wait for it
            deadline = time.monotonic() + 30
            while upload.sent_bytes < PART and time.monotonic() < deadline:
                time.sleep(0.01)
            sent_before_end.append(upload.sent_bytes)

    _write_slowly(path, data, [upload, digest], 1 << 20, pause)
    assert sent_before_end == [PART]  # the first part was stored before the file was whole
    assert not s3.exists("out/grow.bin")  # parts stored, nothing visible before commit
    upload.wait()
    assert upload.sent_bytes == len(data)
    assert not s3.exists("out/grow.bin")
    upload.commit()
    assert upload.state == "committed"
    assert s3.cat_file("out/grow.bin") == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert _pending(s3, "grow.bin") == []


def _stored_checksums(s3, key: str) -> dict[str, str]:
    head = s3.call_s3("head_object", Bucket="out", Key=key, ChecksumMode="ENABLED")
    return {k: v for k, v in head.items() if k.startswith("Checksum") and k != "ChecksumType"}


def test_parts_carry_their_crc32_and_the_object_keeps_the_composite(s3, tmp_path):
    """Every part is sent with its CRC-32; the object's composite checksum (the CRC-32 of the
    parts' CRC-32s) is the one computed here from the file's bytes, part by part."""
    path = str(tmp_path / "sum.bin")
    data = os.urandom(2 * PART + 777)
    open(path, "wb").close()
    upload = FollowingUpload(path, "s3://out/sum.bin", PART)
    assert upload.checksum == "CRC32"
    _write_slowly(path, data, [upload], 1 << 20)
    upload.commit()
    parts = [data[i : i + PART] for i in range(0, len(data), PART)]
    joined = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)
    expected = base64.b64encode(zlib.crc32(joined).to_bytes(4, "big")).decode()
    assert upload.composite_checksum() == expected
    assert _stored_checksums(s3, "sum.bin") == {"ChecksumCRC32": expected}
    assert s3.cat_file("out/sum.bin") == data


def test_without_a_checksum_the_upload_is_plain(s3, tmp_path):
    path = str(tmp_path / "plain.bin")
    data = os.urandom(PART + 5)
    open(path, "wb").close()
    upload = FollowingUpload(path, "s3://out/plain.bin", PART, checksum=None)
    _write_slowly(path, data, [upload], 1 << 20)
    upload.commit()
    assert upload.composite_checksum() is None
    assert "ChecksumCRC32" not in _stored_checksums(s3, "plain.bin")
    assert s3.cat_file("out/plain.bin") == data
    with pytest.raises(CkptError, match="checksum 'MD5': expected one of CRC32"):
        FollowingUpload(path, "s3://out/x.bin", PART, checksum="MD5")


def test_abort_leaves_no_object_and_no_parts(s3, tmp_path):
    path = str(tmp_path / "a.bin")
    data = os.urandom(2 * PART + 1)
    open(path, "wb").close()
    upload = FollowingUpload(path, "s3://out/aborted.bin", PART, metadata={"source": "x"})
    _write_slowly(path, data, [upload], PART)
    upload.wait()
    upload.abort()
    upload.abort()  # twice is fine
    assert upload.state == "aborted"
    assert not s3.exists("out/aborted.bin")
    assert _pending(s3, "aborted.bin") == []
    with pytest.raises(CkptError, match="upload is aborted"):
        upload.commit()


def test_abort_before_the_file_ends_stops_the_uploader(s3, tmp_path):
    path = str(tmp_path / "half.bin")
    open(path, "wb").close()
    upload = FollowingUpload(path, "s3://out/half.bin", PART)
    with open(path, "wb") as f:
        f.write(os.urandom(PART + 10))
    upload.written(PART + 10)  # the writer then fails: finish() never comes
    done = threading.Event()
    threading.Thread(target=lambda: (upload.abort(), done.set()), daemon=True).start()
    assert done.wait(30)
    assert not s3.exists("out/half.bin") and _pending(s3, "half.bin") == []
    with pytest.raises(CkptError, match="before the file was finished|aborted"):
        upload.wait()


def test_metadata_is_set_when_the_upload_starts_and_an_empty_file_is_one_empty_part(s3, tmp_path):
    path = str(tmp_path / "empty.bin")
    open(path, "wb").close()
    upload = FollowingUpload(path, "s3://out/empty.bin", PART, metadata={"plan-digest": "abc"})
    upload.finish(0)
    upload.commit()
    assert s3.cat_file("out/empty.bin") == b""
    assert s3.metadata("out/empty.bin")["plan-digest"] == "abc"


def test_a_part_that_cannot_be_stored_fails_wait_and_commit(s3, tmp_path, monkeypatch):
    """The upload vanishes behind the uploader's back (as if aborted by a lifecycle rule):
    storing a part fails, and that failure is what ``wait``/``commit`` raise."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # moto answers 500 here: no retries wanted
    s3fs.S3FileSystem.clear_instance_cache()
    path = str(tmp_path / "gone.bin")
    data = os.urandom(PART + 100)
    with open(path, "wb") as f:
        f.write(data)
    upload = FollowingUpload(path, "s3://out/gone.bin", PART)
    s3.call_s3("abort_multipart_upload", Bucket="out", Key="gone.bin", UploadId=upload.upload_id)
    upload.finish(len(data))
    with pytest.raises((CkptError, StorageError), match="s3://out/gone.bin: upload failed"):
        upload.wait()
    with pytest.raises((CkptError, StorageError), match="upload failed"):
        upload.commit()
    upload.abort()
    assert not s3.exists("out/gone.bin")
    s3fs.S3FileSystem.clear_instance_cache()


def test_only_s3_destinations_and_real_part_sizes(tmp_path):
    path = str(tmp_path / "x.bin")
    open(path, "wb").close()
    with pytest.raises(CkptError, match="needs an s3:// destination"):
        FollowingUpload(path, str(tmp_path / "y.bin"), PART)
    with pytest.raises(CkptError, match="below S3's minimum"):
        FollowingUpload(path, "s3://out/y.bin", PART - 1)
    assert part_size_for(10 << 20, 64 << 20) == 64 << 20
    assert part_size_for(2 << 40, 64 << 20) * 9000 >= 2 << 40  # 2 TiB still fits in the parts


def test_digest_of_a_file_written_in_odd_steps(tmp_path):
    path = str(tmp_path / "d.bin")
    data = os.urandom(17 << 20)
    open(path, "wb").close()
    digest = FollowingDigest(path)
    with pytest.raises(RuntimeError, match="before the file was finished"):
        digest.hexdigest()
    _write_slowly(path, data, [digest], 3_000_001)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    other = FollowingDigest(path)
    other.cancel()  # a writer that failed: the reader stops


def test_write_nemo_file_is_the_archive_package_nemo_writes_and_feeds_followers(s3, tmp_path):
    folder = tmp_path / "train"
    write_training_checkpoint(str(folder), vit_config("tiny"), tp=2, step=7)
    with open_checkpoint(str(folder)) as ck:
        plan = plan_conversion(ck, 1, 1, "keep")
        ref = str(tmp_path / "ref.nemo")
        package_nemo(nemo_members(ck, plan), ref)
        path = str(tmp_path / "work.nemo")
        open(path, "wb").close()
        digest = FollowingDigest(path)
        upload = FollowingUpload(path, "s3://out/model.nemo", PART)
        size = write_nemo_file(nemo_members(ck, plan), path, [digest, upload])
    with open(ref, "rb") as f:
        expected = f.read()
    assert size == len(expected) == os.path.getsize(path)
    with open(path, "rb") as f:
        assert f.read() == expected
    assert digest.hexdigest() == hashlib.sha256(expected).hexdigest()
    upload.commit()
    assert s3.cat_file("out/model.nemo") == expected
