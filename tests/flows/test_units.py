"""Pieces of the Prefect layer without a flow run: lineage records, retry classification,
source listing and cache keys, uploads to S3 with metadata."""

from __future__ import annotations

import json
import os

import pytest

from ckptcore import lineage
from ckptcore.api import (
    SourceListing,
    default_destination,
    describe_source,
    fetch_checkpoint,
    fetched_is_present,
    locate_checkpoint,
    split_checkpoint_url,
)
from ckptcore.errors import CkptError
from tasks.cache import ContentCache, content_token
from tasks.retry import is_transient


def _record(**kw) -> lineage.LineageRecord:
    base = dict(
        source="s3://b/run/checkpoints",
        checkpoint="x-last.ckpt",
        source_files=[
            lineage.SourceFile("s3://b/run/checkpoints/mp_rank_00/x-last.ckpt", 10, "a" * 64)
        ],
        source_digest="d" * 64,
        step=5,
        epoch=1,
        source_tp=2,
        source_pp=1,
        target_tp=1,
        target_pp=1,
        precision="32",
        plan_digest="p" * 64,
        destination="s3://m/run/vit.nemo",
        run=lineage.RunInfo("convert", "id-1", "calm-cat", "convert/vit", {"target_tp": 1}),
        versions={"python": "3.11"},
        timings={"fetch": 1.0},
    )
    base.update(kw)
    return lineage.LineageRecord(**base)


def test_lineage_record_round_trips_through_json():
    rec = _record().completed(
        lineage.OutputInfo("s3://m/run/vit.nemo", 100, "f" * 64),
        lineage.VerifyInfo(0.0, 1e-5, 4, True, "cpu"),
        {"verify": 0.5},
    )
    back = lineage.LineageRecord.from_json(rec.to_json())
    assert back == rec
    assert back.timings == {"fetch": 1.0, "verify": 0.5}
    assert json.loads(rec.to_json())["schema"] == lineage.SCHEMA


def test_lineage_rejects_other_json():
    with pytest.raises(CkptError, match="not a lineage record"):
        lineage.LineageRecord.from_json('{"schema": "other"}', "x.json")
    with pytest.raises(CkptError, match="not JSON"):
        lineage.LineageRecord.from_json("{", "x.json")


def test_object_metadata_is_short_ascii():
    rec = _record(source="s3://b/" + "é" * 400, checkpoint="ü.ckpt")
    meta = rec.object_metadata()
    assert all(v.isascii() and len(v) <= 256 for v in meta.values())
    assert sum(len(k) + len(v) for k, v in meta.items()) < 2048
    assert meta["lineage"] == "vit.nemo.lineage.json"
    assert "sha256" not in meta  # no output yet


def test_files_digest_ignores_the_bucket_but_not_the_rank():
    a = [lineage.SourceFile("s3://one/x/mp_rank_00/c.ckpt", 1, "a")]
    b = [lineage.SourceFile("/local/y/mp_rank_00/c.ckpt", 1, "a")]
    c = [lineage.SourceFile("/local/y/mp_rank_01/c.ckpt", 1, "a")]
    assert lineage.files_digest(a) == lineage.files_digest(b) != lineage.files_digest(c)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (CkptError("x", "bad"), False),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (OSError(5, "Internal Error"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (KeyError("bug"), False),
        (ValueError("bug"), False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_is_transient_judges_botocore_errors_and_causes():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("SlowDown", 503))
    assert not is_transient(client_error("AccessDenied", 403))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)
    from ckptcore import errors

    storage_error = getattr(errors, "StorageError", None)
    if storage_error is not None:
        err = storage_error("s3://b/k", "reading: reset")
        assert is_transient(err)
        err.__cause__ = FileNotFoundError()
        assert not is_transient(err)


def test_split_checkpoint_url():
    assert split_checkpoint_url("s3://b/r/checkpoints", "latest") == (
        "s3://b/r/checkpoints",
        "latest",
    )
    assert split_checkpoint_url("s3://b/r/checkpoints/mp_rank_01/n.ckpt") == (
        "s3://b/r/checkpoints",
        "n.ckpt",
    )
    assert split_checkpoint_url("s3://b/r/checkpoints/tp_rank_00_pp_rank_001/n.ckpt") == (
        "s3://b/r/checkpoints",
        "n.ckpt",
    )
    assert split_checkpoint_url("/r/checkpoints/n.ckpt") == ("/r/checkpoints", "n.ckpt")


def test_default_destination():
    listing = SourceListing("s3://b/r/checkpoints", "ptl", "m--step=5-last.ckpt", ())
    assert default_destination(listing) == "s3://b/r/checkpoints/nemo/m--step=5-last.nemo"
    assert default_destination(SourceListing("s3://b/m.nemo", "nemo", None, ())) == (
        "s3://b/m-resharded.nemo"
    )


def test_listing_and_fetch_of_the_same_checkpoint_in_two_places(
    s3, tmp_path, prefix, sample_factory
):
    """The content key of a listing depends on the bytes, not on where they are; fetching
    records the sha256 of every file, reading in place the ETag; the cache key of fetch ignores
    paths of the records."""
    one = f"s3://ckpt-training/{prefix}/a/checkpoints"
    sample = sample_factory(s3, one, tp=2)
    s3.put(sample.local + "/", f"ckpt-training/{prefix}/b/checkpoints/", recursive=True)
    la = describe_source(one)
    lb = describe_source(f"s3://ckpt-training/{prefix}/b/checkpoints/mp_rank_01/{sample.name}")
    assert (la.kind, la.checkpoint, len(la.files)) == ("ptl", sample.name, 2)
    assert la.content_key() == lb.content_key()
    assert all(f.etag for f in la.files)

    work = str(tmp_path / "work")
    fa = fetch_checkpoint(la, work)
    assert fetched_is_present(fa)
    for f, rel in zip(fa.files, fa.rels, strict=True):
        assert f.sha256 == lineage.sha256_file(os.path.join(sample.local, rel))
    local = describe_source(sample.local)
    assert [f.sha256 for f in local.files] == [f.sha256 for f in fa.files]
    assert fetch_checkpoint(local, work).local_root == sample.local  # used in place
    # objects are identified by ETag whether read in place or downloaded: the digests agree
    in_place = locate_checkpoint(la, work)
    assert in_place.digest == fa.digest and in_place.in_place and not fa.in_place
    assert in_place.cache_dir and in_place.cache_dir.startswith(work)
    assert [f.etag for f in in_place.files] == [f.etag for f in fa.files]
    assert all(f.sha256 is None for f in in_place.files)
    assert content_token(fa) == fa.content_key() and "/" not in fa.content_key()

    policy = ContentCache()
    key = policy.compute_key(None, {"listing": la, "work_dir": work}, {})  # type: ignore[arg-type]
    assert key == policy.compute_key(None, {"listing": lb, "work_dir": work}, {})  # type: ignore[arg-type]

    os.unlink(os.path.join(fa.local_root, fa.rels[0]))
    assert not fetched_is_present(fa)


def test_s3_upload_is_multipart_with_metadata(s3, tmp_path, prefix, monkeypatch):
    from tasks.publish import put_atomically

    monkeypatch.setenv("CKPT_UPLOAD_CHUNK_BYTES", str(5 << 20))
    big = tmp_path / "big.nemo"
    big.write_bytes(os.urandom(12 << 20))
    key = f"ckpt-models/{prefix}/big.nemo"
    put_atomically(str(big), f"s3://{key}", metadata={"sha256": "abc", "source": "s3://x"})
    assert s3.metadata(key) == {"sha256": "abc", "source": "s3://x"}
    assert s3.info(key)["ETag"].strip('"').endswith("-3")  # three parts
    assert (
        lineage.sha256_file(str(big)) == __import__("hashlib").sha256(s3.cat_file(key)).hexdigest()
    )


def test_asset_keys():
    from tasks.publish import asset_key

    assert asset_key("s3://b/k/m.nemo") == "s3://b/k/m.nemo"
    assert asset_key("/tmp/a b/m.nemo") == "file:///tmp/a_b/m.nemo"
    assert len(asset_key("s3://b/" + "x" * 600)) <= 512


def test_a_source_object_overwritten_after_listing_is_noticed(s3, tmp_path, prefix, sample_factory):
    """The ETags listed are checked again after reading in place: an object overwritten in
    between by another writer fails the run, however much of the listing this process has
    cached; and a later listing in the same process (a sweep) sees the new version."""
    from ckptcore.api import check_unchanged
    from tasks.items import check_unchanged as check_items_unchanged
    from tasks.items import source_objects

    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample = sample_factory(s3, src, tp=2)
    listing = describe_source(src)
    fetched = locate_checkpoint(listing, str(tmp_path / "work"))
    objects = source_objects(listing)  # what the mapped mode's items check
    check_unchanged(fetched)  # nothing changed yet
    check_items_unchanged(objects)
    first = fetched.files[0].url.removeprefix("s3://")
    import s3fs

    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another writer: our caches never see it
    data = bytearray(s3.cat(first))
    data[-1] ^= 1  # a new version of the object, of the same size: only its ETag tells
    other.pipe(first, bytes(data))
    with pytest.raises(CkptError, match=r"changed \(new ETag\) while being read"):
        check_unchanged(fetched)
    with pytest.raises(CkptError, match=r"changed \(new ETag\) since the conversion was planned"):
        check_items_unchanged(objects)
    relisted = describe_source(src)  # a later listing in this process sees the new version
    assert relisted.files[0].etag != fetched.files[0].etag
    del sample


def test_a_partition_written_from_another_version_of_the_source_is_refused(
    s3, tmp_path, prefix, sample_factory
):
    """Deployed, the repartition run lists the source itself (it starts before the parent has
    listed): the partition it leaves names the digest it read, and the parent refuses one
    whose digest is not its own listing's (an object replaced between the two listings)."""
    import s3fs

    from tasks.convert import download_partition, require_same_source, write_partition

    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=2)
    child = locate_checkpoint(describe_source(src), str(tmp_path / "child"))
    location = f"s3://ckpt-scratch/{prefix}/handoff"
    write_partition(child, 1, 1, "keep", location)
    partition = download_partition.fn(location, str(tmp_path / "parent"))
    assert partition.source_digest == child.digest
    parent = locate_checkpoint(describe_source(src), str(tmp_path / "parent"))
    require_same_source(partition, parent)  # the same objects: accepted

    first = parent.files[0].url.removeprefix("s3://")
    data = bytearray(s3.cat(first))
    data[-1] ^= 1  # another writer replaces a rank file (same size)
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(first, bytes(data))
    later = locate_checkpoint(describe_source(src), str(tmp_path / "parent"))
    with pytest.raises(CkptError, match="source changed while it was converted") as info:
        require_same_source(partition, later)
    assert info.value.path == src and "\n" not in str(info.value)
