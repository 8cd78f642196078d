"""ckptcore's one use of a torch internal (``ckptcore.formats.torch_writer``) still agrees with
the public ``torch.save``: a torch release that changes its writer fails here, by name."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from ckptcore.formats import zipwriter
from ckptcore.formats.torch_writer import ID_RECORD, record_name_hash, torch_file_writer


def _saved_id(num_storages: int) -> str:
    buf = io.BytesIO()
    torch.save({f"t{i}": torch.full((2,), float(i)) for i in range(num_storages)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        (name,) = [n for n in z.namelist() if n.endswith(ID_RECORD)]
        return z.read(name).decode()


@pytest.mark.parametrize("num_storages", [0, 1, 3, 17])
def test_the_writer_gives_the_names_hash_torch_save_gives(num_storages: int) -> None:
    names = zipwriter.state_dict_record_names(num_storages)
    assert record_name_hash(names, zipwriter.ALIGN) == _saved_id(num_storages)[:20]


def test_the_tabulated_hashes_are_what_the_writer_gives() -> None:
    table = (
        zipwriter.resources.files("ckptcore.formats")
        .joinpath("torch_record_name_hashes.txt")
        .read_text()
        .split()
    )
    for n in (0, 2, 64, len(table) - 1):
        names = zipwriter.state_dict_record_names(n)
        assert table[n] == record_name_hash(names, zipwriter.ALIGN), n


def test_beyond_the_table_the_hash_is_asked_of_torch() -> None:
    n = len(zipwriter.resources.files("ckptcore.formats").joinpath(
        "torch_record_name_hashes.txt").read_text().split())  # fmt: skip
    assert zipwriter._record_name_hash(n) == _saved_id(n)[:20]


def test_the_writer_is_reachable() -> None:
    w = torch_file_writer(io.BytesIO(), 64)
    assert callable(w.write_record) and callable(w.write_end_of_file)
