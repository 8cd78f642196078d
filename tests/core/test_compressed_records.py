"""Re-zipped checkpoints: deflated zip records are inflated on demand, bounded, one at a time.

``torch.save`` stores records uncompressed; a user who re-zipped a checkpoint (``zip -r``,
Python's ``ZIP_DEFLATED``) has deflated ones. Converting such a file must give exactly the bytes
converting the original gives, say (once per file) that records are inflated in memory, and
refuse every hostile variant (bombs, wrong sizes, truncated or corrupt streams, bad CRCs, other
compression methods) with one clean line naming the file and the problem.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import weakref
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from helpers import local_s3

from ckptcore.api import convert
from ckptcore.cli import main as cli_main
from ckptcore.errors import CkptError
from ckptcore.formats import inflate as inflate_mod
from ckptcore.formats.torchzip import TorchFile, state_dict_of
from ckptcore.sample import vit_config, write_nemo, write_training_checkpoint
from ckptcore.sources import open_checkpoint
from ckptcore.storage import LocalFile, RemoteFile

ROOT = Path(__file__).resolve().parents[2]
CFG = vit_config("tiny")
KEY = "model.backbone.transformer.layers.0.self_attention.dense.weight"  # (64, 64) float32


# --------------------------------------------------------------------------- building files


def rezip(data: bytes, compress_type: int = zipfile.ZIP_DEFLATED, only=None) -> bytes:
    """The same zip re-written by Python's zipfile: same member names and order, compressed
    (all members, or those ``only`` accepts)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            kind = compress_type if only is None or only(info.filename) else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info.filename), compress_type=kind)
    return out.getvalue()


def rezip_file(path: Path, **kwargs) -> None:
    path.write_bytes(rezip(path.read_bytes(), **kwargs))


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@dataclasses.dataclass
class Rec:
    """One record of a hand-built zip: what the directory declares can be anything."""

    name: str
    payload: bytes  # the bytes stored in the file (compressed or not)
    size: int  # declared uncompressed size
    crc: int
    method: int = 8
    flags: int = 0


def records_of(data: bytes) -> list[Rec]:
    """Every member of a zip, deflated by us (declared sizes and CRCs true)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        out = []
        for info in z.infolist():
            raw = z.read(info.filename)
            out.append(Rec(info.filename, deflate(raw), len(raw), zlib.crc32(raw)))
        return out


def build_zip(records: list[Rec]) -> bytes:
    """A plain (non-zip64) zip of ``records``, directory fields exactly as given."""
    out, cd = bytearray(), bytearray()
    for r in records:
        name = r.name.encode()
        off = len(out)
        fields = (r.flags, r.method, 0, 0x21, r.crc, len(r.payload), r.size, len(name))
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, *fields, 0) + name + r.payload
        cd += struct.pack("<4sHH", b"PK\x01\x02", 20, 20)
        cd += struct.pack("<HHHHIIIHHHHHII", *fields, 0, 0, 0, 0, 0, off) + name
    n = len(records)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), len(out), 0)
    return bytes(out + cd + end)


def storage_name(data: bytes, key: str) -> str:
    """The zip record holding ``key``'s storage."""
    path = Path(os.devnull)
    src = _BytesSource(data, str(path))
    tf = TorchFile(src)
    ref = state_dict_of(tf.obj, "x")[key]
    return f"{tf.archive}/data/{ref.storage.key}"


class _BytesSource:
    """A ByteSource over bytes in memory (for looking inside files being built)."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name, self.size = data, name, len(data)

    def read(self, offset: int, length: int) -> memoryview:
        return memoryview(self.data)[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    def close(self) -> None:
        pass


def nemo_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def count_records(path) -> int:
    with zipfile.ZipFile(path) as z:
        return len(z.infolist())


def note(path, compressed: int, total: int) -> str:
    return (
        f"{path}: {compressed} of {total} zip records are compressed (re-zipped?); those read "
        "are inflated in memory one at a time instead of read in place (slower)"
    )


# --------------------------------------------------------------------------- running the CLI


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def refused(src: Path, out: Path, expected: str) -> None:
    """``ckpt convert SRC OUT`` exits 2 with exactly ``expected`` on one line, writes nothing."""
    before = src.read_bytes() if src.is_file() else None
    rc, stdout, stderr = run_cli("convert", src, out)
    assert stderr == f"ckpt: error: {expected}\n", stderr
    assert rc == 2 and stdout == ""
    assert os.listdir(out.parent) == []
    if before is not None:
        assert src.read_bytes() == before


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Originals (a TP=2 training folder, a TP=1 .nemo) and their re-zipped twins."""
    root = tmp_path_factory.mktemp("compressed")
    name, full = write_training_checkpoint(str(root / "train"), CFG, tp=2)
    shutil.copytree(root / "train", root / "train_z")
    for rank in ("mp_rank_00", "mp_rank_01"):
        rezip_file(root / "train_z" / rank / name)
    write_nemo(str(root / "tp1.nemo"), CFG, state_dict=full)
    members = nemo_members(root / "tp1.nemo")
    rezipped = [(n, rezip(d) if n.endswith(".ckpt") else d) for n, d in members]
    write_tar(root / "tp1_z.nemo", rezipped)
    (root / "name").write_text(name)
    return root


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder / "model.nemo"


def weights_ckpt(made: Path) -> bytes:
    """The TP=1 .nemo's model_weights.ckpt (stored records, as torch.save wrote it)."""
    return dict(nemo_members(made / "tp1.nemo"))["./model_weights.ckpt"]


def hostile_nemo(made: Path, tmp_path: Path, weights: bytes) -> Path:
    """The TP=1 .nemo with ``weights`` as its model_weights.ckpt."""
    members = [
        (n, weights if n == "./model_weights.ckpt" else d)
        for n, d in nemo_members(made / "tp1.nemo")
    ]
    return write_tar(tmp_path / "hostile.nemo", members)


def hostile_folder(made: Path, tmp_path: Path, weights: bytes) -> tuple[Path, Path]:
    """An extracted .nemo folder with ``weights``: (folder, the weights file)."""
    folder = tmp_path / "extracted"
    folder.mkdir()
    for n, d in nemo_members(made / "tp1.nemo"):
        (folder / n.removeprefix("./")).write_bytes(d)
    path = folder / "model_weights.ckpt"
    path.write_bytes(weights)
    return folder, path


# --------------------------------------------------------------------------- same results


def test_rezipped_files_really_are_deflated(made):
    name = (made / "name").read_text()
    with zipfile.ZipFile(made / "train_z" / "mp_rank_00" / name) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
        with zipfile.ZipFile(made / "train" / "mp_rank_00" / name) as orig:
            assert [i.filename for i in z.infolist()] == [i.filename for i in orig.infolist()]


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("convert", ()),
        ("convert", ("--target-tp", "1")),
        ("reshard", ("--target-tp", "4", "--target-pp", "2")),
        ("reshard", ("--target-tp", "1", "--workers", "2", "--precision", "bf16")),
    ],
    ids=["keep", "tp1", "tp4pp2", "tp1-bf16-workers"],
)
def test_converting_a_rezipped_training_folder_gives_the_same_bytes(made, tmp_path, command, args):
    a, b = tmp_path / "a.nemo", tmp_path / "b.nemo"
    assert run_cli(command, made / "train", a, *args)[0] == 0
    rc, stdout, stderr = run_cli(command, made / "train_z", b, *args)
    assert rc == 0, stderr
    assert b.read_bytes() == a.read_bytes()
    name = (made / "name").read_text()
    files = [f"{made}/train_z/mp_rank_0{tp}/{name}" for tp in (0, 1)]
    counts = [count_records(f) for f in files]
    notes = [line for line in stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {note(f, n, n)}" for f, n in zip(files, counts, strict=True)]


@pytest.mark.parametrize("args", [(), ("--target-tp", "2"), ("--target-tp", "2", "--workers", "2")])
def test_resharding_a_nemo_with_rezipped_weights_gives_the_same_bytes(made, tmp_path, args):
    a, b = tmp_path / "a.nemo", tmp_path / "b.nemo"
    assert run_cli("reshard", made / "tp1.nemo", a, *args)[0] == 0
    rc, _, stderr = run_cli("reshard", made / "tp1_z.nemo", b, *args)
    assert rc == 0, stderr
    assert b.read_bytes() == a.read_bytes()


def test_torch_load_and_our_reader_agree(made, tmp_path):
    """torch.load reads deflated records (miniz inflates them); so do we, to the same bits."""
    original = tmp_path / "model_weights.ckpt"
    original.write_bytes(weights_ckpt(made))
    zipped = tmp_path / "zipped" / "model_weights.ckpt"
    zipped.parent.mkdir()
    zipped.write_bytes(dict(nemo_members(made / "tp1_z.nemo"))["./model_weights.ckpt"])
    with zipfile.ZipFile(zipped) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    theirs = torch.load(zipped, weights_only=True)
    want = torch.load(original, weights_only=True)
    tf = TorchFile(LocalFile(str(zipped)))
    ours = state_dict_of(tf.obj, str(zipped))
    assert list(ours) == list(theirs) == list(want)
    assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None)
    for key, value in theirs.items():
        if value is None:
            assert ours[key] is None
            continue
        got = tf.tensor(ours[key])
        assert got.dtype == value.dtype and got.shape == value.shape
        assert torch.equal(got.view(-1).view(torch.uint8), value.view(-1).view(torch.uint8))
        assert torch.equal(value.view(-1).view(torch.uint8), want[key].view(-1).view(torch.uint8))


def test_views_and_partly_compressed_files(tmp_path):
    """Views into a shared storage, and a file where only some records are deflated."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"row": base[1], "col": base[:, 2], "t": base.t(), "own": torch.ones(3, dtype=torch.int64)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    path = tmp_path / "v.pt"
    path.write_bytes(rezip(buf.getvalue(), only=lambda n: n.endswith("/data/0")))
    tf = TorchFile(LocalFile(str(path)))
    for k, v in sd.items():
        assert torch.equal(tf.tensor(tf.obj[k]), v)
    assert tf.notes == [note(path, 1, len(tf.records))]
    span = tf.span(tf.obj["row"])  # a contiguous view into the deflated storage
    assert span.local() is None and not span.remote and span.crc is None
    dest = memoryview(bytearray(span.length))
    span.readinto(dest)
    assert bytes(dest) == base[1].numpy().tobytes()
    own = tf.span(tf.obj["own"])  # the stored record: still a local file range
    assert own.local() is not None


def test_compressed_data_pkl_and_stored_tensors(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.randn(4, 4)}, buf)
    path = tmp_path / "p.pt"
    path.write_bytes(rezip(buf.getvalue(), only=lambda n: n.endswith("data.pkl")))
    tf = TorchFile(LocalFile(str(path)))
    assert torch.equal(tf.tensor(tf.obj["w"]), torch.load(path, weights_only=True)["w"])
    assert tf.tensor(tf.obj["w"]).numel() == 16
    assert tf.span(tf.obj["w"]).local() is not None
    assert tf.notes == [note(path, 1, len(tf.records))]


def test_a_plain_torch_save_file_has_no_note(made):
    tf = TorchFile(LocalFile(str(made / "train" / "mp_rank_00" / (made / "name").read_text())))
    assert tf.notes == []


def test_the_note_is_there_once_per_file(made):
    with open_checkpoint(str(made / "train_z")) as ck:
        name = (made / "name").read_text()
        for (tp, _), sr in ck.ranks.items():
            tf = sr.span_reader.__self__  # type: ignore[union-attr]
            path = f"{made}/train_z/mp_rank_0{tp}/{name}"
            count = len(tf.records)
            assert tf.notes == [note(path, count, count)]


def test_the_note_reaches_the_checkpoint_and_inspect(made):
    name = (made / "name").read_text()
    with open_checkpoint(str(made / "train_z")) as ck:
        paths = [f"{made}/train_z/mp_rank_0{tp}/{name}" for tp in (0, 1)]
        assert ck.notes == [note(p, count_records(p), count_records(p)) for p in paths]
    count = count_records(io.BytesIO(weights_ckpt(made)))
    with open_checkpoint(str(made / "tp1_z.nemo")) as ck:
        assert ck.notes == [note(f"{made}/tp1_z.nemo:model_weights.ckpt", count, count)]
    rc, stdout, _ = run_cli("inspect", made / "tp1_z.nemo")
    assert (
        rc == 0
        and f"  note: {note(f'{made}/tp1_z.nemo:model_weights.ckpt', count, count)}" in stdout
    )
    with open_checkpoint(str(made / "train")) as ck:
        assert not any("inflated" in n for n in ck.notes)


def test_each_record_is_inflated_once_and_one_is_alive_at_a_time(made, tmp_path, monkeypatch):
    """TP=2 -> TP=1 reads every source record once (replicas compared, then copied: no second
    inflation); memory holds one inflated record per source file."""
    live: set[int] = set()
    peak = [0]
    calls: collections.Counter = collections.Counter()
    real_inflate, real_held = inflate_mod.inflate, inflate_mod._Held

    def counting(src, start, csize, size, crc, path, record):
        calls[(path, record)] += 1
        return real_inflate(src, start, csize, size, crc, path, record)

    class Tracked(real_held):
        __slots__ = ()

        def __init__(self, data):
            super().__init__(data)
            live.add(id(self))
            peak[0] = max(peak[0], len(live))
            weakref.finalize(self, live.discard, id(self))

    monkeypatch.setattr(inflate_mod, "_Held", Tracked)
    monkeypatch.setattr(inflate_mod, "inflate", counting)
    convert(str(made / "train_z"), str(tmp_path / "o.nemo"), target_tp=1)
    assert calls and max(calls.values()) == 1, calls
    assert peak[0] == 2


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_inflate_in_any_step_size(monkeypatch, step):
    """Compressed input read and output produced in steps of any size: the same bytes."""
    monkeypatch.setattr(inflate_mod, "CHUNK", step)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3000, generator=g).numpy().tobytes() + bytes(20000) + b"xyz" * 1000
    packed = b"junk" + deflate(raw) + b"more"
    src = _BytesSource(packed, "mem")
    got = inflate_mod.inflate(src, 4, len(packed) - 8, len(raw), zlib.crc32(raw), "mem", "r")
    assert bytes(got) == raw
    with pytest.raises(CkptError, match="inflates to more than the 100 bytes"):
        inflate_mod.inflate(src, 4, len(packed) - 8, 100, zlib.crc32(raw), "mem", "r")
    with pytest.raises(CkptError, match=f"inflates to more than the {len(raw) - 1} bytes"):
        inflate_mod.inflate(src, 4, len(packed) - 8, len(raw) - 1, 0, "mem", "r")
    with pytest.raises(CkptError, match=f"inflates to {len(raw)} bytes, its zip directory"):
        inflate_mod.inflate(src, 4, len(packed) - 8, len(raw) + 1, 0, "mem", "r")
    with pytest.raises(CkptError, match="4 stray bytes"):
        inflate_mod.inflate(src, 4, len(packed) - 4, len(raw), zlib.crc32(raw), "mem", "r")
    empty = deflate(b"")
    assert inflate_mod.inflate(_BytesSource(empty, "m"), 0, len(empty), 0, 0, "m", "r") == b""


def test_threads_reading_the_same_records_share_them(made, tmp_path, monkeypatch):
    """Four threads reading every tensor of a file: each record is inflated once at a time,
    and the bytes are right."""
    import threading

    calls: collections.Counter = collections.Counter()
    real = inflate_mod.inflate

    def counting(*args):
        calls[args[-1]] += 1
        return real(*args)

    monkeypatch.setattr(inflate_mod, "inflate", counting)
    path = tmp_path / "w.ckpt"
    path.write_bytes(dict(nemo_members(made / "tp1_z.nemo"))["./model_weights.ckpt"])
    want = torch.load(path, weights_only=True)
    tf = TorchFile(LocalFile(str(path)))
    refs = {k: v for k, v in state_dict_of(tf.obj, str(path)).items() if v is not None}
    errors = []
    barrier = threading.Barrier(4)

    def work() -> None:
        try:
            barrier.wait()
            for key, ref in refs.items():
                span = tf.span(ref)
                buf = memoryview(bytearray(span.length))
                for off in range(0, span.length, 1000):  # in blocks, like the engine
                    span.readinto(buf[off : off + 1000], off)
                assert bytes(buf) == want[key].numpy().tobytes(), key
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(calls) == {f"{tf.archive}/data/{r.storage.key}" for r in refs.values()}
    assert max(calls.values()) <= 4  # at worst once per thread, never once per block


# --------------------------------------------------------------------------- hostile files


def test_bzip2_and_lzma_records_are_refused_by_method(made, tmp_path, out):
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    for kind, label in ((zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "lzma")):
        src = hostile_nemo(made, tmp_path, rezip(data, kind, only=lambda n: n == target))
        refused(
            src,
            out,
            f"{src}:model_weights.ckpt: record {target} is compressed with {label} "
            f"(zip method {kind}); only stored and deflate records can be read",
        )


def test_unknown_method_on_a_record_never_read_is_no_problem(made, tmp_path, out):
    """Only records that are read must be readable: a training file's optimizer state may be
    compressed with anything."""
    name = (made / "name").read_text()
    folder = tmp_path / "train"
    shutil.copytree(made / "train", folder)
    path = folder / "mp_rank_01" / name
    data = path.read_bytes()
    wanted = {
        f"archive/data/{v.storage.key}"
        for v in state_dict_of(TorchFile(_BytesSource(data, "x")).obj, "x").values()
        if v is not None
    }
    path.write_bytes(
        rezip(data, zipfile.ZIP_LZMA, only=lambda n: "/data/" in n and n not in wanted)
    )
    rc, _, stderr = run_cli("convert", folder, out, "--target-tp", "1")
    assert rc == 0, stderr
    ref = out.parent / "ref.nemo"
    assert run_cli("convert", made / "train", ref, "--target-tp", "1")[0] == 0
    assert out.read_bytes() == ref.read_bytes()


def test_encrypted_record(made, tmp_path, out):
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            r.flags = 1
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(src, out, f"{src}:model_weights.ckpt: record {target} is encrypted")


def test_zip_bomb_inflating_beyond_its_declared_size(made, tmp_path, out):
    """64 MiB of zeros in a record that declares the tensor's 16 KiB: stopped at 16 KiB + 1."""
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    bomb = b"\0" * (64 << 20)
    for r in recs:
        if r.name == target:
            r.payload, r.crc = deflate(bomb), zlib.crc32(bomb)
            assert r.size == 16384
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        refused(
            src,
            out,
            f"{src}:model_weights.ckpt: record {target} inflates to more than the 16384 "
            "bytes its zip directory declares (a zip bomb?)",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # far below the 64 MiB the stream holds
    assert time.perf_counter() - start < 20


def test_zip_bomb_declared_in_the_directory(made, tmp_path, out):
    """A record declaring ~4 GiB from a few KiB is refused before anything is inflated."""
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            r.size = 0xFFFFFFF0
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    calls = []
    real = inflate_mod.inflate

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inflate_mod, "inflate", spy)
        refused(
            src,
            out,
            f"{src}:model_weights.ckpt: record {target} expands beyond 1073741824 bytes "
            "(a zip bomb?)",
        )
    assert calls == []


def test_zip_bomb_ratio_applies_beyond_the_floor(made, tmp_path, out, monkeypatch):
    monkeypatch.setattr(inflate_mod, "MAX_INFLATE_FLOOR", 1024)
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    zeros = bytes(16384)
    for r in recs:
        if r.name == target:
            r.payload, r.crc = deflate(zeros), zlib.crc32(zeros)
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    csize = len(deflate(zeros))
    assert 16384 > 50 * csize
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {target} expands beyond {50 * csize} bytes "
        "(a zip bomb?)",
    )


@pytest.mark.parametrize("delta", [64, -64])
def test_declared_size_differs_from_the_tensor_storage(made, tmp_path, out, delta):
    """A self-consistent record (size and CRC true) whose size is not the storage's nbytes."""
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        raw = z.read(target)
    raw = raw + bytes(delta) if delta > 0 else raw[:delta]
    for r in recs:
        if r.name == target:
            r.payload, r.size, r.crc = deflate(raw), len(raw), zlib.crc32(raw)
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    key = target.rsplit("/", 1)[1]
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: compressed storage record data/{key} declares "
        f"{16384 + delta} bytes uncompressed, expected 16384",
    )


def test_record_inflating_to_less_than_declared(made, tmp_path, out):
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        raw = z.read(target)
    for r in recs:
        if r.name == target:
            r.payload = deflate(raw[:-100])
    folder, path = hostile_folder(made, tmp_path, build_zip(recs))
    refused(
        folder,
        out,
        f"{path}: record {target} inflates to 16284 bytes, its zip directory declares 16384",
    )


def test_truncated_deflate_stream(made, tmp_path, out):
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            r.payload = cut = r.payload[: len(r.payload) // 2]
    got = len(zlib.decompressobj(-15).decompress(cut))
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {target} holds a truncated deflate stream "
        f"({got} of 16384 bytes inflated)",
    )


def test_deflate_stream_without_its_last_block(made, tmp_path, out):
    """Every byte is there but the stream never ends (sync-flushed, no final block)."""
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        raw = z.read(target)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    for r in recs:
        if r.name == target:
            r.payload = c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH)
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {target} holds a truncated deflate stream "
        "(16384 of 16384 bytes inflated)",
    )


def test_stray_bytes_after_the_deflate_stream(made, tmp_path, out):
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            r.payload += b"trailing"
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {target} has 8 stray bytes after the end of its "
        "deflate stream",
    )


def test_corrupt_deflate_stream(made, tmp_path, out):
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            r.payload = b"\xff" * 32  # final block of the reserved type 3
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {target} holds a corrupt deflate stream "
        "(Error -3 while decompressing data: invalid block type)",
    )


def test_bad_crc(made, tmp_path, out):
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            good, r.crc = r.crc, r.crc ^ 0x10
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {target} fails its CRC-32 check "
        f"(0x{good:08x}, the zip directory says 0x{good ^ 0x10:08x})",
    )


def test_compressed_data_pkl_with_a_bad_crc(made, tmp_path, out):
    data = weights_ckpt(made)
    recs = records_of(data)
    for r in recs:
        if r.name.endswith("data.pkl"):
            good, r.crc, pkl = r.crc, r.crc ^ 1, r.name
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {pkl} fails its CRC-32 check "
        f"(0x{good:08x}, the zip directory says 0x{good ^ 1:08x})",
    )


def test_compressed_data_pkl_bomb(made, tmp_path, out):
    data = weights_ckpt(made)
    recs = records_of(data)
    bomb = b"\0" * (32 << 20)
    for r in recs:
        if r.name.endswith("data.pkl"):
            size, r.payload, r.crc, pkl = r.size, deflate(bomb), zlib.crc32(bomb), r.name
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    refused(
        src,
        out,
        f"{src}:model_weights.ckpt: record {pkl} inflates to more than the {size} bytes its "
        "zip directory declares (a zip bomb?)",
    )


def test_hostile_record_through_a_subprocess(made, tmp_path, out):
    """``python -m ckptcore.cli``: one line, exit 2, no traceback, nothing written."""
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            r.crc ^= 1
    src = hostile_nemo(made, tmp_path, build_zip(recs))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ckptcore.cli", "reshard", str(src), str(out), "--target-tp", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"ckpt: error: {src}:model_weights.ckpt: record {target} fails")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert os.listdir(out.parent) == []


def test_errors_from_the_reader_name_the_file(made, tmp_path):
    """The same checks reached through the library: a CkptError whose path is the file."""
    data = weights_ckpt(made)
    target = storage_name(data, KEY)
    recs = records_of(data)
    for r in recs:
        if r.name == target:
            r.crc ^= 1
    path = tmp_path / "w.ckpt"
    path.write_bytes(build_zip(recs))
    tf = TorchFile(LocalFile(str(path)))
    span = tf.span(state_dict_of(tf.obj, str(path))[KEY])
    with pytest.raises(CkptError) as info:
        span.readinto(memoryview(bytearray(span.length)))
    assert info.value.path == str(path) and "CRC-32" in info.value.problem


# --------------------------------------------------------------------------- object storage


@pytest.fixture(scope="module")
def s3():
    with local_s3("zipped") as fs:
        yield fs


def test_rezipped_checkpoint_on_s3(made, s3, tmp_path, monkeypatch):
    """Read in place from S3: the compressed ranges are fetched ahead (not the uncompressed
    ones), every byte of them once, and the result equals converting the local original."""
    s3.put(str(made / "train_z") + "/", "zipped/run/", recursive=True)
    planned: list[tuple[str, int, int]] = []
    opened: list[RemoteFile] = []
    real_plan, real_init = RemoteFile.plan_reads, RemoteFile.__init__

    def spy_plan(self, ranges):
        planned.extend((self.name, off, n) for off, n in ranges)
        return real_plan(self, ranges)

    def spy_init(self, *a, **kw):
        real_init(self, *a, **kw)
        opened.append(self)

    monkeypatch.setattr(RemoteFile, "plan_reads", spy_plan)
    monkeypatch.setattr(RemoteFile, "__init__", spy_init)
    convert("s3://zipped/run", str(tmp_path / "s3.nemo"), target_tp=1)
    monkeypatch.undo()
    convert(str(made / "train"), str(tmp_path / "local.nemo"), target_tp=1)
    assert (tmp_path / "s3.nemo").read_bytes() == (tmp_path / "local.nemo").read_bytes()

    name = (made / "name").read_text()
    expected = set()
    for rank in ("mp_rank_00", "mp_rank_01"):
        data = (made / "train_z" / rank / name).read_bytes()
        sd = state_dict_of(TorchFile(_BytesSource(data, "x")).obj, "x")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for v in sd.values():
                if v is None:
                    continue
                info = z.getinfo(f"archive/data/{v.storage.key}")
                off = info.header_offset + 30 + len(info.filename) + len(info.extra)
                expected.add((f"s3://zipped/run/{rank}/{name}", off, info.compress_size))
    assert set(planned) <= expected
    # replicated tensors are compared by CRC: only rank 0's copy is fetched
    assert len(set(planned)) >= len(expected) // 2
    fetched = sum(f.bytes_read for f in opened)
    compressed = sum(n for _, _, n in set(planned))
    assert fetched <= 1.1 * compressed + (256 << 10), (fetched, compressed)


# --------------------------------------------------------------------------- fuzzing


def test_fuzz_rezipped_weights(made, tmp_path):
    """Bytes of a re-zipped rank file changed anywhere (compressed payloads included): a clean
    CkptError, or a result holding exactly what the damaged file holds."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ckptcore.api import load_state_dict
    from ckptcore.engine import materialize
    from ckptcore.plan import build_plan

    members = nemo_members(made / "tp1_z.nemo")
    weights = dict(members)["./model_weights.ckpt"]
    outcomes: collections.Counter = collections.Counter()
    counter = iter(range(10**6))

    @settings(
        max_examples=int(os.environ.get("CKPT_FUZZ_EXAMPLES", "60")),
        derandomize=not os.environ.get("CKPT_FUZZ_RANDOM"),
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        edits=st.lists(
            st.tuples(
                st.integers(0, len(weights) - 1),
                st.sampled_from(["flip", "zero", "cut"]),
                st.integers(0, 7),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def run(edits) -> None:
        data = bytearray(weights)
        for pos, kind, arg in edits:
            if not data:
                break
            pos = min(pos, len(data) - 1)
            if kind == "flip":
                data[pos] ^= 1 << arg
            elif kind == "zero":
                data[pos : pos + 8 * (arg + 1)] = bytes(len(data[pos : pos + 8 * (arg + 1)]))
            else:
                del data[pos:]
        src = tmp_path / f"fuzz-{next(counter)}.nemo"
        write_tar(src, [(n, bytes(data) if n.endswith(".ckpt") else d) for n, d in members])
        dest = tmp_path / "fuzz-out.nemo"
        try:
            convert(str(src), str(dest), overwrite=True)
        except CkptError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            return
        _, got = load_state_dict(str(dest))
        with open_checkpoint(str(src)) as ck:
            want = materialize(ck, build_plan(ck, 1, 1).files[0])
        assert list(got) == list(want)
        for key, value in want.items():
            if value is None:
                assert got[key] is None
            else:
                assert torch.equal(
                    got[key].view(-1).view(torch.uint8), value.view(-1).view(torch.uint8)
                )
        outcomes["converted"] += 1

    run()
    assert outcomes["refused"] > 0
