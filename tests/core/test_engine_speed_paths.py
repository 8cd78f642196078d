"""The fast paths of the streaming engine give the same bytes as the plain path.

Rank files written from local sources go through the helper thread (kernel copies of whole
records with their stored CRCs combined, row gathers block by block, long rows copied per row);
their bytes must equal what the in-memory path writes (torch tensors, CRCs computed). No timing.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
import threading
import zipfile
import zlib

import numpy as np
import pytest
import torch

from ckptcore import engine
from ckptcore.api import convert
from ckptcore.errors import CkptError
from ckptcore.formats import zipwriter
from ckptcore.formats.zipwriter import crc32_combine, crc32_concat
from ckptcore.plan import build_plan
from ckptcore.sample import random_state_dict, vit_config, write_nemo
from ckptcore.sources import open_checkpoint

KEY = "model.backbone.transformer.layers.0."
COLUMN = KEY + "mlp.dense_h_to_4h.weight"  # split along dim 0
ROW = KEY + "mlp.dense_4h_to_h.weight"  # split along dim 1
REPLICATED = KEY + "input_layernorm.weight"


def _ranks(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.name.endswith("model_weights.ckpt")
        }


def _source(tmp_path, tp: int, pp: int = 1, sd=None, dtype=torch.float32):
    cfg = vit_config("tiny", layers=4, dtype=dtype)
    full = sd if sd is not None else random_state_dict(cfg, seed=5, dtype=dtype)
    src = tmp_path / f"src_tp{tp}_pp{pp}.nemo"
    write_nemo(str(src), cfg, tp=tp, pp=pp, state_dict=full)
    return cfg, full, src


def _reference(tmp_path, cfg, full, tp: int, pp: int = 1) -> dict[str, bytes]:
    ref = tmp_path / f"ref_tp{tp}_pp{pp}.nemo"
    write_nemo(str(ref), cfg, tp=tp, pp=pp, state_dict=full)  # in-memory tensors, CRCs computed
    return _ranks(ref)


def _check_zip(data: bytes) -> None:
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every record's CRC-32 holds


def test_crc32_combine_matches_zlib() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = rng.randbytes(rng.randint(0, 2000))
        b = rng.randbytes(rng.randint(0, 2000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    parts = [rng.randbytes(rng.randint(0, 300)) for _ in range(9)]
    assert crc32_concat((zlib.crc32(p), len(p)) for p in parts) == zlib.crc32(b"".join(parts))
    assert crc32_concat([]) == 0
    big = bytes(3 << 20)
    assert crc32_combine(zlib.crc32(b"x"), zlib.crc32(big), len(big)) == zlib.crc32(b"x" + big)


@pytest.mark.parametrize("fast", [True, False])
def test_crc32_array_matches_zlib(fast) -> None:
    zipwriter.use_fast_crc(fast)  # False: as where the isal package is missing
    try:
        assert (zipwriter.fast_crc32() is not None) == fast  # isal is a declared dependency
        arr = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
        for n in (0, 5, 1 << 16, (1 << 16) + 3, arr.nbytes):
            assert zipwriter.crc32_array(arr[:n]) == zlib.crc32(arr[:n])
            assert zipwriter.crc32_array(arr[:n], 0xDEADBEEF) == zlib.crc32(arr[:n], 0xDEADBEEF)
            data = arr[:n].tobytes()
            assert zipwriter.crc32_bytes(memoryview(data), 7) == zlib.crc32(data, 7)
    finally:
        zipwriter.use_fast_crc(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_scan_every_dtype(dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    x = (torch.randn(4099) * 100).to(dtype)
    x[5] = torch.finfo(dtype).max
    x[6] = torch.finfo(dtype).min
    for tmp in (None, np.zeros(1 << 16, np.uint8), np.zeros(8, np.uint8)):
        assert not engine._has_nonfinite(memoryview(x.view(torch.uint8).numpy()), name, tmp)
        for value in (float("nan"), -float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[4098] = value
            assert engine._has_nonfinite(memoryview(y.view(torch.uint8).numpy()), name, tmp)


@pytest.mark.parametrize(
    ("src_tp", "src_pp", "tp", "pp"),
    [(4, 1, 2, 1), (4, 1, 1, 1), (2, 2, 1, 1), (1, 1, 2, 1), (2, 1, 4, 2)],
)
@pytest.mark.parametrize("blocks", ["default", "tiny"])
def test_fast_paths_equal_the_in_memory_path(
    tmp_path, monkeypatch, src_tp, src_pp, tp, pp, blocks
) -> None:
    if blocks == "tiny":  # many blocks, a partial last one, rows wider than a block
        monkeypatch.setattr(engine, "GATHER_BLOCK", 96)
        monkeypatch.setattr(engine, "COPY_PART", 1024)
        monkeypatch.setattr(engine, "SCAN_BLOCK", 256)
        monkeypatch.setattr(engine, "_AHEAD_ITEMS", 2)
        monkeypatch.setattr(engine, "_RING", 2)
    cfg, full, src = _source(tmp_path, src_tp, src_pp)
    out = tmp_path / "out.nemo"
    convert(str(src), str(out), target_tp=tp, target_pp=pp)
    ours = _ranks(out)
    assert ours == _reference(tmp_path, cfg, full, tp, pp)
    for data in ours.values():
        _check_zip(data)


def test_long_rows_are_copied_per_row(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(engine, "SEGMENT_COPY", 64)
    monkeypatch.setattr(engine, "COPY_PART", 128)
    cfg, full, src = _source(tmp_path, 4)
    out = tmp_path / "out.nemo"
    convert(str(src), str(out), target_tp=1)
    assert _ranks(out) == _reference(tmp_path, cfg, full, 1)


def test_sixteen_bit_sources(tmp_path) -> None:
    cfg, full, src = _source(tmp_path, 2, dtype=torch.bfloat16)
    out = tmp_path / "out.nemo"
    convert(str(src), str(out), target_tp=1)
    assert _ranks(out) == _reference(tmp_path, cfg, full, 1)


@pytest.mark.parametrize("key", [COLUMN, ROW, REPLICATED])
@pytest.mark.parametrize("tiny", [False, True])
def test_nonfinite_found_on_every_path(tmp_path, monkeypatch, key, tiny) -> None:
    if tiny:
        monkeypatch.setattr(engine, "GATHER_BLOCK", 96)
        monkeypatch.setattr(engine, "SCAN_BLOCK", 256)
        monkeypatch.setattr(engine, "SEGMENT_COPY", 64)
    cfg = vit_config("tiny", layers=4)
    sd = random_state_dict(cfg, seed=5)
    sd[key].view(-1)[-1] = float("nan")
    cfg, full, src = _source(tmp_path, 4, sd=sd)
    out = tmp_path / "out.nemo"
    with pytest.raises(CkptError, match=f"{key}: holds NaN or Inf"):
        convert(str(src), str(out), target_tp=2)
    assert not out.exists()
    convert(str(src), str(out), target_tp=2, allow_nonfinite=True)
    assert _ranks(out) == _reference(tmp_path, cfg, full, 2)


def _flip_in_file(path, raw: bytes, last: bool = False) -> None:
    data = path.read_bytes()
    at = data.rfind(raw) if last else data.find(raw)
    assert at > 0 and (last or data.find(raw, at + 1) < 0)
    with open(path, "r+b") as f:
        f.seek(at + 3)
        f.write(bytes([data[at + 3] ^ 0x10]))


def test_replicas_still_compared_byte_for_byte(tmp_path) -> None:
    cfg, full, src = _source(tmp_path, 2)
    with open_checkpoint(str(src)) as ck:
        raw = ck.ranks[(1, 0)].tensor(REPLICATED).numpy().tobytes()
    _flip_in_file(src, raw, last=True)  # rank 1's copy changed, its stored CRC not
    with pytest.raises(CkptError, match=f"{REPLICATED}: replicated tensor differs"):
        convert(str(src), str(tmp_path / "out.nemo"), target_tp=1)


@pytest.mark.parametrize("key", [REPLICATED, KEY + "self_attention.dense.bias"])
def test_the_first_differing_replica_is_named(tmp_path, monkeypatch, key) -> None:
    monkeypatch.setattr(engine, "SCAN_BLOCK", 64)  # several blocks per replica
    cfg = vit_config("tiny", layers=4)
    sd = random_state_dict(cfg, seed=5)
    sd[key].view(-1)[0] = float("nan")  # a NaN in every copy does not hide a mismatch
    cfg, full, src = _source(tmp_path, 4, sd=sd)
    with open_checkpoint(str(src)) as ck:
        raw = ck.ranks[(0, 0)].tensor(key).numpy().tobytes()
    data = src.read_bytes()
    at = [i for i in range(len(data)) if data.startswith(raw, i)]
    assert len(at) == 4  # one copy per rank, in rank order
    with open(src, "r+b") as f:
        for where, delta in ((at[3], 8), (at[2], len(raw) - 1)):  # ranks 3 and 2 differ
            f.seek(where + delta)
            f.write(bytes([data[where + delta] ^ 0x01]))
    with pytest.raises(CkptError, match=r"\(tp=0, pp=0\) and \(tp=2, pp=0\)"):
        convert(str(src), str(tmp_path / "out.nemo"), target_tp=1, allow_nonfinite=True)
    with pytest.raises(CkptError, match=r"\(tp=0, pp=0\) and \(tp=2, pp=0\)"):
        convert(str(src), str(tmp_path / "out.nemo"), target_tp=1)


def test_stored_crcs_are_carried_over(tmp_path) -> None:
    """Whole records keep the source's CRC: a record corrupted in the source is still caught by
    zip tools in the output (not re-blessed with a fresh CRC). Documented in engine.known_crc."""
    cfg, full, src = _source(tmp_path, 2)
    with open_checkpoint(str(src)) as ck:
        raw = ck.ranks[(0, 0)].tensor(COLUMN).numpy().tobytes()
    _flip_in_file(src, raw)
    out = tmp_path / "out.nemo"
    convert(str(src), str(out), target_tp=2)  # the same layout: every record copied whole
    (data,) = [d for name, d in _ranks(out).items() if "mp_rank_00" in name]
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is not None


def test_sinks_without_kernel_copy_and_staged_files(tmp_path) -> None:
    cfg, full, src = _source(tmp_path, 4)
    ref = _reference(tmp_path, cfg, full, 2)
    with open_checkpoint(str(src)) as ck:
        plan = build_plan(ck, 2, 1)
        for fp in plan.files:
            buf = io.BytesIO()
            engine.write_rank(ck, fp, buf.write, allow_nonfinite=False)  # mmap views written
            assert buf.getvalue() == ref["./" + fp.path]
        staged = engine.execute(plan, ck, str(tmp_path / "stage"), workers=2)
        for fp, path in zip(plan.files, staged, strict=True):
            with open(path, "rb") as f:
                assert f.read() == ref["./" + fp.path]


def test_a_failing_sink_stops_the_helper_thread(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(engine, "_AHEAD_ITEMS", 1)
    cfg, full, src = _source(tmp_path, 4)
    written = 0

    def sink(data) -> None:
        nonlocal written
        written += len(data)
        if written > 50_000:
            raise OSError("disk full")

    with open_checkpoint(str(src)) as ck:
        fp = build_plan(ck, 1, 1).files[0]
        with pytest.raises(OSError, match="disk full"):
            engine.write_rank(ck, fp, sink)
    assert not [t for t in threading.enumerate() if t.name == "ckpt-producer"]


def test_write_behind_and_reserved_blocks_keep_the_bytes(tmp_path, monkeypatch) -> None:
    real = zipwriter._libc()["sync_file_range"]
    if real is None:
        pytest.skip("no sync_file_range here")
    cfg, full, src = _source(tmp_path, 4)
    ref = _reference(tmp_path, cfg, full, 2)
    calls = []

    def record(fd, offset, length, flags):
        calls.append((offset, length))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(zipwriter, "WRITE_BEHIND", 4096)
    monkeypatch.setitem(zipwriter._libc(), "sync_file_range", record)
    out = tmp_path / "out.nemo"
    convert(str(src), str(out), target_tp=2)
    zipwriter._flush_pool().submit(lambda: None).result()  # the requests are made in order
    assert _ranks(out) == ref
    assert calls and calls[0][0] == 0  # consecutive ranges from the start, all >= WRITE_BEHIND
    assert all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:], strict=False))
    assert all(n >= 4096 for _, n in calls)
    size = os.path.getsize(out)
    assert calls[-1][0] + calls[-1][1] <= size
    # the rank files' blocks were reserved exactly: nothing allocated past the end of the file
    assert os.stat(out).st_blocks * 512 <= size + (64 << 10)


def test_reserve_keeps_the_size(tmp_path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        sink = zipwriter.file_sink(fd)
        sink(b"head")
        sink.reserve(1 << 20)
        sink(b"tail")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"headtail"
