"""Object storage through s3fs against a real local S3 server (moto on 127.0.0.1): selective reads."""

from __future__ import annotations

import contextlib
import os

import pytest
from helpers import bitwise_equal, local_s3, open_files_under, rank_state_dicts

from ckptcore.api import convert, load_state_dict
from ckptcore.sample import vit_config, write_training_checkpoint
from ckptcore.sources import open_checkpoint
from ckptcore.storage import RemoteFile


@pytest.fixture(scope="module")
def s3_url():
    with local_s3("ckpts") as fs:
        yield fs


def test_convert_s3_to_s3_reads_only_the_weights(s3_url, tmp_path) -> None:
    fs = s3_url
    cfg = vit_config("small")
    local = tmp_path / "ck"
    _, full = write_training_checkpoint(str(local), cfg, tp=2, optimizer=True)
    fs.put(str(local) + "/", "ckpts/run1/", recursive=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs_ in os.walk(local) for f in fs_)
    out = "s3://ckpts/out/model.nemo"
    opened: list[RemoteFile] = []
    original = RemoteFile.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        opened.append(self)

    RemoteFile.__init__ = spy
    try:
        report = convert("s3://ckpts/run1", out, target_tp=1)
    finally:
        RemoteFile.__init__ = original
    weights = report.tensor_bytes
    read = sum(f.bytes_read for f in opened)
    # the optimizer state (two thirds of the files) was never fetched
    assert total > 2.5 * weights
    assert read <= 1.05 * weights, (read, weights)
    fetched = tmp_path / "model.nemo"
    fs.get(out, str(fetched))
    _, sd = load_state_dict(str(fetched))
    assert bitwise_equal(sd, full)


def test_nemo_on_s3_reads_in_place_and_failed_upload_leaves_nothing(s3_url, tmp_path) -> None:
    fs = s3_url
    from ckptcore.sample import write_nemo

    src = tmp_path / "a.nemo"
    write_nemo(str(src), vit_config("tiny"))
    fs.put(str(src), "ckpts/in/a.nemo")
    convert("s3://ckpts/in/a.nemo", "s3://ckpts/in/b.nemo", target_tp=2)
    with open_checkpoint("s3://ckpts/in/b.nemo") as ck:
        assert (ck.tp, ck.pp) == (2, 1)
    local = rank_state_dicts(str(src))
    fs.get("ckpts/in/b.nemo", str(tmp_path / "b.nemo"))
    convert(str(tmp_path / "b.nemo"), str(tmp_path / "c.nemo"), target_tp=1)
    assert bitwise_equal(rank_state_dicts(str(tmp_path / "c.nemo"))[(0, 0)], local[(0, 0)])
    # a conversion that fails midway (NaN found while writing) leaves no object behind
    from ckptcore.errors import CkptError
    from ckptcore.sample import random_state_dict

    sd = random_state_dict(vit_config("tiny"))
    sd["model.head.dense_out.weight"][0, 0] = float("inf")
    write_nemo(str(tmp_path / "bad.nemo"), vit_config("tiny"), state_dict=sd)
    with pytest.raises(CkptError, match="NaN or Inf"):
        convert(str(tmp_path / "bad.nemo"), "s3://ckpts/in/bad-out.nemo")
    assert not fs.exists("ckpts/in/bad-out.nemo")


def _spy_remote_files(monkeypatch) -> list[RemoteFile]:
    opened: list[RemoteFile] = []
    original = RemoteFile.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        opened.append(self)

    monkeypatch.setattr(RemoteFile, "__init__", spy)
    return opened


def test_range_cache_lets_verify_reuse_what_the_conversion_read(
    s3_url, tmp_path, monkeypatch
) -> None:
    """Convert in place from S3 with a range cache, then verify: the weights are fetched once."""
    from ckptcore.api import nemo_members, package_nemo, plan_conversion, verify

    fs = s3_url
    cfg = vit_config("small")
    local = tmp_path / "ck"
    write_training_checkpoint(str(local), cfg, tp=2, optimizer=True)
    fs.put(str(local) + "/", "ckpts/cached/", recursive=True)
    cache = str(tmp_path / "cache")
    opened = _spy_remote_files(monkeypatch)
    out = tmp_path / "out.nemo"
    with open_checkpoint("s3://ckpts/cached", cache=cache) as ck:
        plan = plan_conversion(ck, 1, 1, "keep")
        package_nemo(nemo_members(ck, plan), str(out))
    weights = sum(f.write_bytes for f in plan.files)
    converted = sum(f.bytes_read for f in opened)
    assert converted <= 1.05 * weights, (converted, weights)
    del opened[:]
    report = verify("s3://ckpts/cached", str(out), cache=cache)
    assert report.passed and report.max_abs_diff == 0.0
    again = sum(f.bytes_read for f in opened)
    hits = sum(f.cached_bytes for f in opened)
    # verify found every weight byte in the cache (only a few small replicas may differ)
    assert hits >= 0.95 * weights, (hits, weights)
    assert again <= 0.05 * weights, (again, weights)


def test_range_cache_never_serves_a_changed_object(s3_url, tmp_path) -> None:
    from ckptcore.storage import RangeCache

    fs = s3_url
    fs.pipe("ckpts/blob.bin", b"a" * 1000)
    cache = RangeCache(str(tmp_path / "cache"))
    first = RemoteFile("s3://ckpts/blob.bin", cache=cache)
    assert first.read(100, 50) == b"a" * 50
    assert first.bytes_read == 50 and first.cached_bytes == 0
    assert first.read(110, 20) == b"a" * 20  # inside a stored range: local
    assert first.read(140, 20) == b"a" * 20  # crosses the end of it: fetched
    assert (first.bytes_read, first.cached_bytes) == (70, 20)
    first.close()
    again = RemoteFile("s3://ckpts/blob.bin", cache=cache)  # a later reader, same object
    assert again.read(100, 60) == b"a" * 60
    assert (again.bytes_read, again.cached_bytes) == (0, 60)
    again.close()
    fs.pipe("ckpts/blob.bin", b"b" * 1000)  # same size, new content: a new ETag
    changed = RemoteFile("s3://ckpts/blob.bin", cache=cache)
    assert changed.read(100, 50) == b"b" * 50
    assert (changed.bytes_read, changed.cached_bytes) == (50, 0)
    changed.close()


def test_opening_locates_every_weight_record_in_one_batch(s3_url, tmp_path, monkeypatch) -> None:
    """The local zip headers of the weights' records are read together when a file is opened
    (concurrent ranged GETs), so planning issues no round trip per tensor."""
    from ckptcore.api import plan_conversion
    from ckptcore.engine import planned_reads

    fs = s3_url
    local = tmp_path / "ck"
    write_training_checkpoint(str(local), vit_config("tiny"), tp=2, optimizer=True)
    fs.put(str(local) + "/", "ckpts/located/", recursive=True)
    opened = _spy_remote_files(monkeypatch)
    batches: list[int] = []
    original = RemoteFile.read_ranges

    def spy(self, ranges):
        batches.append(len(ranges))
        return original(self, ranges)

    monkeypatch.setattr(RemoteFile, "read_ranges", spy)
    with open_checkpoint("s3://ckpts/located") as ck:
        after_open = sum(f.requests for f in opened)
        plan = plan_conversion(ck, 1, 1, "keep")
        spans = [s for tt in plan.files[0].tensors for s in planned_reads(ck, tt)]
        assert spans and sum(f.requests for f in opened) == after_open  # no I/O to plan
    from ckptcore.formats.safe_pickle import TensorRef

    records = sum(
        len({v.storage.key for v in r.state.values() if isinstance(v, TensorRef)})
        for r in ck.ranks.values()
    )
    assert len(batches) == 2  # one batch per rank file
    assert 2 <= sum(batches) < records  # headers close together share a request


def test_records_read_with_the_headers_are_not_fetched_again(s3_url, tmp_path, monkeypatch) -> None:
    """The header batch also brings the small records between the headers; they are kept (in
    memory, without a range cache) and converting fetches only the rest: no byte of the file
    is fetched twice, and opening took far fewer requests than one per record."""
    from ckptcore.api import plan_conversion, write_converted
    from ckptcore.formats.safe_pickle import TensorRef

    fs = s3_url
    local = tmp_path / "ck"
    write_training_checkpoint(str(local), vit_config("tiny"), tp=2, optimizer=True)
    fs.put(str(local) + "/", "ckpts/once/", recursive=True)
    fetched: dict[str, list[tuple[int, int]]] = {}
    real_read, real_batch = RemoteFile.read, RemoteFile.read_ranges

    def read(self, offset, length):
        if length and self._holder(offset, length) is None:
            fetched.setdefault(self.name, []).append((offset, offset + length))
        return real_read(self, offset, length)

    def read_ranges(self, ranges):
        for offset, length in ranges:
            if self._holder(offset, length) is None:
                fetched.setdefault(self.name, []).append((offset, offset + length))
        return real_batch(self, ranges)

    monkeypatch.setattr(RemoteFile, "read", read)
    monkeypatch.setattr(RemoteFile, "read_ranges", read_ranges)
    opened = _spy_remote_files(monkeypatch)
    with open_checkpoint("s3://ckpts/once") as ck:
        records = sum(
            len({v.storage.key for v in sr.state.values() if isinstance(v, TensorRef)})
            for sr in ck.ranks.values()
        )
        requests_at_open = sum(f.requests for f in opened)
        plan = plan_conversion(ck, 1, 1, "keep")
        write_converted(ck, plan, "s3://ckpts/once", str(tmp_path / "out.nemo"))
    assert requests_at_open < records / 2  # one request per header: more than records
    assert len(fetched) == 2
    for name, ranges in fetched.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
            assert start >= end, f"{name}: fetched twice from {start} to {end}: {ranges}"
    _, expected = load_state_dict(str(local))
    _, got = load_state_dict(str(tmp_path / "out.nemo"))
    assert bitwise_equal(expected, got)


def test_range_cache_is_shared_by_readers_of_one_object_in_a_process(s3_url, tmp_path) -> None:
    """Threads reading one object through one cache folder add to one list of ranges."""
    from ckptcore.storage import RangeCache

    fs = s3_url
    fs.pipe("ckpts/shared.bin", bytes(range(256)) * 8)
    folder = str(tmp_path / "cache")
    a = RemoteFile("s3://ckpts/shared.bin", cache=RangeCache(folder))
    b = RemoteFile("s3://ckpts/shared.bin", cache=RangeCache(folder))
    assert a.read(0, 100) == (bytes(range(256)) * 8)[:100]
    assert b.read(1000, 100) == (bytes(range(256)) * 8)[1000:1100]
    a.close()  # b still reads through the shared file
    assert b.read(0, 100) == (bytes(range(256)) * 8)[:100] and b.cached_bytes == 100
    b.close()
    c = RemoteFile("s3://ckpts/shared.bin", cache=RangeCache(folder))
    assert c.read(0, 100) and c.read(1000, 100) and c.bytes_read == 0  # both were recorded
    c.close()


def test_announced_ranges_are_fetched_in_few_large_requests() -> None:
    from ckptcore.storage import coalesce

    mb = 1 << 20
    # records separated by their zip headers become one request, up to the part size
    records = [(i * (mb + 100), mb) for i in range(10)]
    assert coalesce(records, 64 << 10, 64 * mb) == [(0, 9 * (mb + 100) + mb)]
    # three records (3 MiB + 200 bytes) fit in 4 MiB, a fourth would not
    assert coalesce(records, 64 << 10, 4 * mb) == [
        (i * (mb + 100), (i + 2) * (mb + 100) + mb) for i in (0, 3, 6)
    ] + [(9 * (mb + 100), 9 * (mb + 100) + mb)]
    # a wide gap (skipped optimizer state), going backwards, or a long range: new requests
    assert coalesce([(0, 10), (10 + (1 << 20), 10), (0, 5)], 64 << 10, 64 * mb) == [
        (0, 10),
        (10 + (1 << 20), 20 + (1 << 20)),
        (0, 5),
    ]
    assert coalesce([(5, 10 * mb)], 0, 4 * mb) == [
        (5, 5 + 4 * mb),
        (5 + 4 * mb, 5 + 8 * mb),
        (5 + 8 * mb, 5 + 10 * mb),
    ]


def test_read_concurrency_is_configurable(s3_url, monkeypatch) -> None:
    """``CKPT_READ_CONCURRENCY`` sets the ranged GETs in flight per object; bad values are one
    line naming the setting."""
    from ckptcore.errors import CkptError

    fs = s3_url
    fs.pipe("ckpts/conc.bin", bytes(range(256)) * 4096)
    monkeypatch.setenv("CKPT_READ_CONCURRENCY", "2")
    f = RemoteFile("s3://ckpts/conc.bin")
    f.plan_reads([(i * 100_000, 50_000) for i in range(8)])
    assert f._pool is not None and f._pool._max_workers == 2
    buf = bytearray(50_000)
    f.readinto(300_000, memoryview(buf))
    assert bytes(buf) == (bytes(range(256)) * 4096)[300_000:350_000]
    f.close()
    monkeypatch.setenv("CKPT_READ_CONCURRENCY", "lots")
    g = RemoteFile("s3://ckpts/conc.bin")
    with pytest.raises(CkptError, match="CKPT_READ_CONCURRENCY='lots'"):
        g.plan_reads([(0, 10), (1_000_000, 10)])
    g.close()


def test_closing_a_remote_checkpoint_releases_its_range_cache(s3_url, tmp_path) -> None:
    """Once closed, nothing holds the cache files open: clean-work deleting the folder frees
    the disk at once, also in a process that goes on converting (a sweep)."""
    from ckptcore.storage import RangeCache

    fs = s3_url
    write_training_checkpoint(str(tmp_path / "ck"), vit_config("tiny"), tp=2, optimizer=True)
    fs.put(str(tmp_path / "ck") + "/", "ckpts/closing/", recursive=True)
    cache = str(tmp_path / "cache")
    with open_checkpoint("s3://ckpts/closing", cache=cache) as ck:
        load_state_dict(ck)
        assert open_files_under(cache)
    assert open_files_under(cache) == []
    assert not any(p.startswith(os.path.realpath(cache)) for p in RangeCache._open)


def test_a_range_cache_entry_closed_while_in_use_closes_when_the_user_is_done(tmp_path) -> None:
    """A read-ahead still writing when its checkpoint is closed keeps the descriptor until it
    is done (its number cannot be reused under it), and a write after the close stores nothing."""
    from ckptcore.errors import CkptError
    from ckptcore.storage import CachedObject

    entry = CachedObject(str(tmp_path / "entry"), 100)
    with entry._using_fd() as fd:
        entry.close()
        assert fd is not None
        os.pwrite(fd, b"late", 0)  # still this entry's file
    assert open_files_under(str(tmp_path)) == []
    entry.put(10, b"after")
    assert entry.stored_bytes() == 0
    with pytest.raises(CkptError, match="closed"):
        entry.read(0, 4)


def test_headers_only_plans_with_fewer_bytes_and_finds_records_later(s3_url, tmp_path) -> None:
    """Opened to plan (``headers_only``), a training checkpoint in S3 costs its zip directories
    and pickles, not every record's local header; a record's place asked for later is the one
    an eager open finds."""
    from ckptcore.sources import headers_only

    fs = s3_url
    local = tmp_path / "ck"
    write_training_checkpoint(str(local), vit_config("small"), tp=2, optimizer=True)
    fs.put(str(local) + "/", "ckpts/plan/", recursive=True)
    read: dict[str, int] = {}
    original = RemoteFile.__init__

    for mode in ("eager", "headers"):
        opened: list[RemoteFile] = []

        def spy(self, *a, _opened=opened, **kw):
            original(self, *a, **kw)
            _opened.append(self)

        RemoteFile.__init__ = spy
        try:
            with headers_only() if mode == "headers" else contextlib.nullcontext():
                ck = open_checkpoint("s3://ckpts/plan")
            read[mode] = sum(f.bytes_read for f in opened)
            spans = {
                (rank, key): (s.offset, s.length)
                for rank, r in ck.ranks.items()
                for key in r.state
                if (s := r.span(key)) is not None
            }
            ck.close()
        finally:
            RemoteFile.__init__ = original
        read[mode + "-spans"] = spans  # type: ignore[assignment]
    assert read["headers"] < 0.8 * read["eager"], read  # the local headers not read
    assert read["headers-spans"] == read["eager-spans"] and read["eager-spans"]
