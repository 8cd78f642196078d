"""Fuzzing: valid ``.nemo`` and ``.ckpt`` bytes with bits flipped, bytes set, cut, inserted or
deleted, mostly where parsers look (tar headers, zip headers and directory, the pickle, the YAML).

Every mutated file must give either a clean ``CkptError`` or a correct result (a ``.nemo``
holding exactly what the mutated source holds) — never another exception, a hang or a crash.
The examples are derandomized (the same ones every run, so CI is stable); set
``CKPT_FUZZ_EXAMPLES=1000 CKPT_FUZZ_RANDOM=1`` for a longer, fresh search.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import tarfile
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hostile_helpers import ckpt_proc, copy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptcore.api import convert, load_state_dict
from ckptcore.engine import materialize
from ckptcore.errors import CkptError
from ckptcore.plan import build_plan
from ckptcore.sources import open_checkpoint

FUZZ = settings(
    max_examples=int(os.environ.get("CKPT_FUZZ_EXAMPLES", "60")),
    deadline=timedelta(seconds=20),
    derandomize=not os.environ.get("CKPT_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

Region = tuple[int, int]


def zip_regions(data: bytes, base: int = 0) -> list[Region]:
    """Byte ranges of a torch zip's structure: local headers, data.pkl, central directory, end."""
    regions = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            start = info.header_offset
            regions.append((base + start, base + start + 30 + len(info.filename) + 64))
            if info.filename.endswith("data.pkl"):
                off = start + 30 + len(info.filename) + len(info.extra)
                regions.append((base + off, base + off + info.file_size))
        cd = z.start_dir
    regions.append((base + cd, base + len(data)))
    return regions


def nemo_regions(path: Path) -> list[Region]:
    data = path.read_bytes()
    regions = [(0, len(data))]
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            regions.append((info.offset, info.offset_data))  # the header (and any pax header)
            if info.name.endswith("model_config.yaml"):
                regions.append((info.offset_data, info.offset_data + info.size))
            elif info.name.endswith("model_weights.ckpt"):
                member = data[info.offset_data : info.offset_data + info.size]
                regions += zip_regions(member, info.offset_data)
    return regions


@st.composite
def mutations(draw, regions: list[Region]):
    """1-3 edits, each inside a region: flip a bit, set a byte, zero a run, insert, delete, cut."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        lo, hi = draw(st.sampled_from(regions))
        pos = draw(st.integers(lo, max(lo, hi - 1)))
        kind = draw(st.sampled_from(["flip", "set", "zero", "insert", "delete", "cut"]))
        if kind == "flip":
            edits.append((kind, pos, 1 << draw(st.integers(0, 7))))
        elif kind == "set":
            edits.append((kind, pos, draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))))
        elif kind in ("zero", "delete"):
            edits.append((kind, pos, draw(st.integers(1, 64))))
        elif kind == "insert":
            edits.append((kind, pos, draw(st.binary(min_size=1, max_size=16))))
        else:
            edits.append((kind, pos, 0))
    return edits


def mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, len(buf))
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= arg
        elif kind == "set" and pos < len(buf):
            buf[pos] = arg
        elif kind == "zero":
            buf[pos : pos + arg] = bytes(len(buf[pos : pos + arg]))
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos : pos + arg]
        elif kind == "cut":
            del buf[pos:]
    return bytes(buf)


def check(source: str, dest: Path, **kwargs) -> str:
    """Convert; a CkptError is a pass, so is a result that holds exactly what the source holds."""
    try:
        convert(source, str(dest), overwrite=True, **kwargs)
    except CkptError as exc:
        assert "\n" not in str(exc)
        return "refused"
    _, got = load_state_dict(str(dest))
    with open_checkpoint(source) as ck:  # what the source holds: replicated tensors from rank 0
        want = materialize(ck, build_plan(ck, 1, 1, check_replicas=False).files[0])
    assert list(got) == list(want)
    for key, value in want.items():
        if value is None:
            assert got[key] is None
        else:
            assert torch.equal(
                got[key].view(-1).view(torch.uint8), value.view(-1).view(torch.uint8)
            )
    return "converted"


class Outcomes:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1


def test_fuzz_nemo(templates, tmp_path):
    regions = nemo_regions(templates.nemo_tp2)
    data = templates.nemo_tp2.read_bytes()
    counter = itertools.count()
    outcomes = Outcomes()

    @FUZZ
    @given(edits=mutations(regions))
    def run(edits) -> None:
        path = tmp_path / f"fuzz-{next(counter)}.nemo"  # a new file each time: no stale mmaps
        path.write_bytes(mutate(data, edits))
        try:
            outcomes.add(check(str(path), tmp_path / "out.nemo", target_tp=1))
        finally:
            path.unlink()  # unlinking leaves live mmaps valid (truncating would not)

    run()
    assert outcomes.counts.get("refused", 0) > 0


def test_fuzz_ckpt(templates, tmp_path):
    name = templates.train_name
    original = (templates.train_tp1 / name).read_bytes()
    regions = [(0, len(original)), *zip_regions(original)]
    counter = itertools.count()
    outcomes = Outcomes()

    @FUZZ
    @given(edits=mutations(regions))
    def run(edits) -> None:
        folder = tmp_path / f"train-{next(counter)}"
        folder.mkdir()
        (folder / name).write_bytes(mutate(original, edits))
        try:
            outcomes.add(check(str(folder), tmp_path / "out.nemo", target_tp=2))
        finally:
            shutil.rmtree(folder)

    run()
    assert outcomes.counts.get("refused", 0) > 0


@pytest.mark.parametrize(
    "edits",
    [
        [("cut", 20000, 0)],  # inside the rank file's records
        [("flip", 0, 0x20)],  # the first tar header's name
        [("zero", 1100, 64)],  # the config's header
    ],
    ids=["cut", "flip-header", "zero-config-header"],
)
def test_fuzzed_files_through_the_cli(templates, tmp_path, out, edits):
    """The same through ``python -m ckptcore.cli``: one line, exit 2, nothing written."""
    src = copy(templates.nemo_tp2, tmp_path / "src.nemo")
    src.write_bytes(mutate(src.read_bytes(), edits))
    proc = ckpt_proc("reshard", src, out, "--target-tp", "1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"ckpt: error: {src}") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert os.listdir(out.parent) == []
