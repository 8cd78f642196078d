"""A ``.nemo``'s layout follows from its members' sizes alone: members written independently at
their places (``archive_layout`` / ``write_member_at``, in any order, by any process) give the
archive ``write_nemo`` writes in one pass, byte for byte."""

from __future__ import annotations

import io
import os
import random
import tarfile

import pytest

from ckptcore.errors import CkptError
from ckptcore.formats import nemo as nemo_fmt


def _files(tmp_path, seed: int) -> dict[str, nemo_fmt.MemberData]:
    rng = random.Random(seed)
    files: dict[str, nemo_fmt.MemberData] = {
        nemo_fmt.CONFIG_NAME: b"precision: 32\n" * rng.randint(1, 40),
        "lineage.json": b"{}" + b" " * rng.randint(0, 2000),
    }
    for tp in range(rng.randint(1, 3)):
        for pp in range(rng.randint(1, 2)):
            rel = f"tp_rank_{tp:02d}_pp_rank_{pp:03d}/model_weights.ckpt"
            size = rng.choice([0, 1, 511, 512, 513, 70_000])
            blob = bytes(rng.getrandbits(8) for _ in range(size))
            if (tp + pp) % 2:
                path = tmp_path / f"{tp}-{pp}.bin"
                path.write_bytes(blob)
                files[rel] = str(path)
            else:
                files[rel] = nemo_fmt.MemberSource(len(blob), lambda sink, b=blob: sink(b))
    return files


def _sizes(files) -> dict[str, int]:
    return {rel: nemo_fmt._size_of(d) for rel, d in files.items()}


@pytest.mark.parametrize("seed", range(6))
def test_members_written_in_place_in_any_order_make_the_same_archive(tmp_path, seed) -> None:
    files = _files(tmp_path, seed)
    one_pass = io.BytesIO()
    nemo_fmt.write_nemo(one_pass, files)
    placements, total = nemo_fmt.archive_layout(_sizes(files))
    assert total == len(one_pass.getvalue())
    path = tmp_path / "in-place.nemo"
    with open(path, "wb") as f:
        f.truncate(total)  # what the writers share: a file of the archive's size
    order = [p for p in placements]
    random.Random(seed).shuffle(order)
    fd = os.open(path, os.O_RDWR)
    try:
        for placement in order:
            data = b"" if placement.rel is None else files[placement.rel]
            nemo_fmt.write_member_at(fd, placement, data)
    finally:
        os.close(fd)
    assert path.read_bytes() == one_pass.getvalue()
    with tarfile.open(path) as tar:  # and it is a tar whose members sit where the layout says
        for info, placement in zip(tar.getmembers(), placements, strict=True):
            assert (info.name, info.offset_data) == (placement.name, placement.data_offset)


def test_a_member_of_another_size_is_refused(tmp_path) -> None:
    placements, total = nemo_fmt.archive_layout({nemo_fmt.CONFIG_NAME: 10})
    target = next(p for p in placements if p.rel == nemo_fmt.CONFIG_NAME)
    path = tmp_path / "x.nemo"
    path.write_bytes(b"\0" * total)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(CkptError, match="produced 11 bytes, expected 10"):
            nemo_fmt.write_member_at(fd, target, b"x" * 11)
    finally:
        os.close(fd)
