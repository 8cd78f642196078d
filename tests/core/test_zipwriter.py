"""The zip writer's layout equals torch's writer beyond 4 GiB too (zip64), checked on sparse files."""

from __future__ import annotations

import os

from ckptcore.formats.torch_writer import torch_file_writer
from ckptcore.formats.zipwriter import TorchZipWriter, archive_size

BIG = (1 << 32) + 7


def _torch_file(path: str, records: list[tuple[str, int]]) -> None:
    w = torch_file_writer(path, 64)
    for name, size in records:
        if size >= 1 << 20:
            w.write_record_metadata(name, size)  # skips the data: a sparse file
        else:
            w.write_record(name, b"x" * size, size)
    w.write_end_of_file()


def _our_file(path: str, records: list[tuple[str, int]], archive: str, storages: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def sink(data) -> None:
        if isinstance(data, int):
            os.lseek(fd, data, os.SEEK_CUR)
        else:
            os.write(fd, data)

    w = TorchZipWriter(sink, archive, storages)
    for name, size in records:
        if size >= 1 << 20:
            w.write_record(name, size, [size], 0)  # torch writes CRC 0 for skipped data
        else:
            w.write_bytes(name, b"x" * size)
    w.finish()
    os.close(fd)


def _regions(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        f.seek(max(0, size - (1 << 16)))
        return head + f.read()


def test_zip64_layout_matches_torch(tmp_path) -> None:
    records = [
        ("data.pkl", 100),
        (".format_version", 1),
        (".storage_alignment", 2),
        ("byteorder", 6),
        ("data/0", BIG),  # a record over 4 GiB
        ("data/1", 40),  # a record whose offset is over 4 GiB
        ("data/2", 0),
    ]
    theirs, ours = tmp_path / "t" / "m.ckpt", tmp_path / "o" / "m.ckpt"
    theirs.parent.mkdir()
    ours.parent.mkdir()
    _torch_file(str(theirs), records)
    _our_file(str(ours), records, "m", 3)
    size = os.path.getsize(theirs)
    assert os.path.getsize(ours) == size == archive_size("m", records, 3)
    assert _regions(str(ours), size) == _regions(str(theirs), size)
