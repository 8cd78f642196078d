"""An archive assembled by many writers (``ckptcore.assembly``): pieces written where the work
runs, in any order, one in another process, then the tail and the commit, give the archive one
pass writes, byte for byte: in a local file and as one S3 multipart upload (a real local S3
server) whose parts came from different writers. What a writer wrote is checked against the
source, and a changed byte is found."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import sys

import pytest
from helpers import local_s3

from ckptcore import assembly
from ckptcore.api import dump_config, plan_conversion
from ckptcore.engine import file_layout
from ckptcore.errors import CkptError
from ckptcore.formats import nemo as nemo_fmt
from ckptcore.sample import vit_config, write_nemo
from ckptcore.sources import open_checkpoint, torch_rank
from ckptcore.storage import LocalFile, SubRange

TRAILER_BYTES = b'{"made": "here"}\n' * 7


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    src = str(tmp_path_factory.mktemp("src") / "a.nemo")
    write_nemo(src, vit_config("tiny", layers=4), tp=2)
    return src


def _job(src: str, tp: int, pp: int):
    with open_checkpoint(src) as ck:
        plan = plan_conversion(ck, tp, pp)
    files = {fp.path: fp for fp in plan.files}
    small = {nemo_fmt.CONFIG_NAME: dump_config(plan.config)}
    sizes = {
        **{k: len(v) for k, v in small.items()},
        **{p: file_layout(fp).size for p, fp in files.items()},
    }
    return files, small, sizes


def _one_pass(src: str, files, small) -> bytes:
    out = io.BytesIO()
    with open_checkpoint(src) as ck:
        members = {**small, nemo_fmt.TRAILER: TRAILER_BYTES}
        members.update({p: assembly.rank_member(ck, fp) for p, fp in files.items()})
        nemo_fmt.write_nemo(out, members)
    return out.getvalue()


def _small_for(piece: assembly.Piece, small: dict[str, bytes]) -> dict[str, bytes]:
    return {rel: small[rel] for rel in piece.files() if rel in small}


def _in_another_process(src, files, small, piece, target) -> assembly.PieceResult:
    code = (
        "import pickle, sys\n"
        "from ckptcore.assembly import write_piece\n"
        "args = pickle.loads(sys.stdin.buffer.read())\n"
        "sys.stdout.buffer.write(pickle.dumps(write_piece(*args)))\n"
    )
    payload = pickle.dumps((src, "last", files, _small_for(piece, small), piece, target))
    done = subprocess.run(
        [sys.executable, "-c", code], input=payload, check=True, capture_output=True
    )
    return pickle.loads(done.stdout)


def _tail_data(src, files, small):
    ck = open_checkpoint(src)

    def produce(rel: str):
        return small[rel] if rel in small else assembly.rank_member(ck, files[rel])

    return ck, produce


def test_pieces_written_in_any_order_make_the_one_pass_archive_in_a_file(source, tmp_path):
    files, small, sizes = _job(source, 1, 2)
    plan = assembly.assembly_for(str(tmp_path / "out.nemo"), sizes, list(files))
    assert len(plan.pieces) == len(files)  # a file archive: one piece per rank file
    target = assembly.begin_archive(str(tmp_path / "out.nemo"), plan)
    assert not (tmp_path / "out.nemo").exists()
    first, *rest = plan.pieces
    results = [_in_another_process(source, files, small, first, target)]
    for piece in reversed(rest):
        results.append(
            assembly.write_piece(source, "last", files, _small_for(piece, small), piece, target)
        )
    assert all(r.checked and r.tensors_checked > 0 for r in results)
    assert sum(r.tensors_checked for r in results) == sum(
        1 for fp in files.values() for t in fp.tensors if t.spec is not None
    )
    ck, produce = _tail_data(source, files, small)
    with ck:
        tail = assembly.write_tail(plan, target, TRAILER_BYTES, produce)
    assert not (tmp_path / "out.nemo").exists()  # nothing visible before the commit
    assembly.commit_archive(target, [])
    data = (tmp_path / "out.nemo").read_bytes()
    assert data == _one_pass(source, files, small)
    assert tail.size_bytes == len(data)
    assert tail.written_bytes == len(data) - plan.tail_start < 0.05 * len(data)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nemo"]  # no work file left


def test_a_changed_byte_is_found_by_the_writers_check(source, tmp_path):
    files, small, sizes = _job(source, 2, 1)
    plan = assembly.assembly_for(str(tmp_path / "out.nemo"), sizes, list(files))
    target = assembly.begin_archive(str(tmp_path / "out.nemo"), plan)
    piece = plan.pieces[-1]
    assembly.write_piece(
        source, "last", files, _small_for(piece, small), piece, target, check=False
    )
    member = next(p for p in piece.placements if p.rel in files)
    src = SubRange(LocalFile(target.path), member.data_offset, member.size, member.name)
    rank = torch_rank(src, 1, 0)
    key = next(k for k in rank.state if rank.span(k) is not None and rank.span(k).length > 8)
    at = member.data_offset + rank.span(key).offset + 5  # a byte inside that tensor's data
    src.close()
    fd = os.open(target.path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x10]), at)
    finally:
        os.close(fd)
    with (
        open_checkpoint(source) as ck,
        pytest.raises(CkptError, match="differs from its source slice"),
    ):
        assembly.check_members(ck, files, target.path, piece.placements)
    assembly.abort_archive(target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", range(8))
def test_pieces_cover_the_archive_and_parts_keep_the_minimum(seed):
    rng = random.Random(seed)
    sizes = {nemo_fmt.CONFIG_NAME: rng.randint(10, 3000)}
    work = []
    for tp in range(rng.randint(1, 4)):
        for pp in range(rng.randint(1, 3)):
            rel = f"tp_rank_{tp:02d}_pp_rank_{pp:03d}/model_weights.ckpt"
            sizes[rel] = rng.choice([600, 5000, 20_000, 90_000])
            work.append(rel)
    minimum, part = rng.choice([(1, 1), (4096, 4096), (30_000, 40_000), (10**6, 10**6)])
    plan = assembly.plan_assembly(sizes, work, part_bytes=part, min_part=minimum)
    at = 0
    numbers = []
    for piece in plan.pieces:
        assert piece.start == at and piece.size >= minimum
        assert piece.placements[0].offset == piece.start and piece.placements[-1].end == piece.end
        assert piece.placements[-1].rel in work  # a piece ends with a rank file
        assert piece.parts[0][1] == piece.start and piece.parts[-1][2] == piece.end
        for (n, _, b), nxt in zip(piece.parts, piece.parts[1:], strict=False):
            assert b == nxt[1] and nxt[0] == n + 1
        assert all(b - a >= min(part, piece.size) for _, a, b in piece.parts)
        numbers += [n for n, _, _ in piece.parts]
        at = piece.end
    assert at == plan.tail_start
    assert numbers == list(range(1, len(numbers) + 1)) and plan.tail_part == len(numbers) + 1
    in_pieces = {rel for piece in plan.pieces for rel in piece.files()}
    in_tail = {p.rel for p in plan.tail if p.rel}
    assert in_pieces | in_tail == set(sizes) and not in_pieces & in_tail
    if in_tail & set(work):  # only when no piece could be long enough
        assert not plan.pieces and sum(sizes.values()) < minimum * 2


@pytest.fixture(scope="module")
def s3():
    with local_s3("assembled") as fs:
        yield fs


def test_parts_from_many_writers_make_one_upload_equal_to_the_one_pass_archive(
    source, s3, monkeypatch
):
    import moto.s3.models

    # the store's minimum part size, lowered with ours so that a tiny model makes many parts;
    # the store still refuses a short part that is not the last
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 8192)
    files, small, sizes = _job(source, 2, 2)
    url = "s3://assembled/assembled/model.nemo"
    plan = assembly.plan_assembly(sizes, list(files), part_bytes=8192, min_part=8192)
    assert len(plan.pieces) >= 2 and plan.tail_part > len(plan.pieces)
    target = assembly.begin_archive(url, plan)
    first, *rest = plan.pieces
    parts = list(_in_another_process(source, files, small, first, target).parts)
    for piece in rest:
        result = assembly.write_piece(
            source, "last", files, _small_for(piece, small), piece, target
        )
        assert result.checked and result.tensors_checked > 0
        parts += result.parts
    ck, produce = _tail_data(source, files, small)
    with ck:
        tail = assembly.write_tail(plan, target, TRAILER_BYTES, produce)
    assert not s3.exists(url)  # nothing visible before the commit
    assembly.commit_archive(target, [*parts, tail.part])
    assert s3.cat_file(url) == _one_pass(source, files, small)
    assert s3.call_s3("list_multipart_uploads", Bucket="assembled").get("Uploads", []) == []


def test_an_aborted_upload_leaves_nothing(source, s3):
    files, small, sizes = _job(source, 1, 1)
    url = "s3://assembled/aborted/model.nemo"
    plan = assembly.plan_assembly(sizes, list(files), part_bytes=1 << 20, min_part=1 << 20)
    assert plan.pieces == ()  # a tiny model: the tail holds it all
    target = assembly.begin_archive(url, plan)
    assembly.abort_archive(target)
    assert not s3.exists(url)
    assert s3.call_s3("list_multipart_uploads", Bucket="assembled").get("Uploads", []) == []


def test_many_small_rank_files_still_fit_in_the_stores_parts():
    work = [
        f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt"
        for t in range(100)
        for p in range(150)
    ]
    sizes = {rel: 6 << 20 for rel in work}  # 15,000 rank files of 6 MiB: 88 GiB
    plan = assembly.assembly_for("s3://b/big.nemo", sizes, work)
    assert plan.tail_part <= 10_000
    assert all(piece.size >= 5 << 20 for piece in plan.pieces)
