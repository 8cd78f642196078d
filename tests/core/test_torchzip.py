"""The torch zip format: lazy reads equal torch.load; streaming writes equal torch.save byte for byte."""

from __future__ import annotations

import collections
import io
import os

import pytest
import torch

from ckptcore.errors import CkptError
from ckptcore.formats.torchzip import TensorSpec, TorchFile, state_dict_of, write_state_dict
from ckptcore.storage import LocalFile


def _sample() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(1)
    sd = collections.OrderedDict()
    sd["a.weight"] = torch.randn(5, 3, generator=g)
    sd["a.bias"] = torch.randn(5, generator=g).to(torch.bfloat16)
    sd["a._extra_state"] = None
    sd["b.weight"] = torch.randn(2, 3, 4, generator=g).to(torch.float16)
    sd["c.scalar"] = torch.tensor(3.5)
    sd["d.empty"] = torch.zeros(0, 4)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("a", {"version": 1})])
    return sd


def _write(path: str, sd: collections.OrderedDict) -> None:
    entries = [
        (k, None if v is None else TensorSpec(v.dtype, tuple(v.shape))) for k, v in sd.items()
    ]
    write_state_dict(path, entries, lambda k: sd[k], metadata=sd._metadata)


def test_streaming_writer_is_byte_identical_to_torch_save(tmp_path) -> None:
    sd = _sample()
    ours, theirs = (
        tmp_path / "ours" / "model_weights.ckpt",
        tmp_path / "theirs" / "model_weights.ckpt",
    )
    ours.parent.mkdir()
    theirs.parent.mkdir()
    _write(str(ours), sd)
    torch.save(sd, str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()


def test_writer_to_file_object_uses_archive_prefix(tmp_path) -> None:
    sd = _sample()
    buf = io.BytesIO()
    entries = [
        (k, None if v is None else TensorSpec(v.dtype, tuple(v.shape))) for k, v in sd.items()
    ]
    write_state_dict(buf, entries, lambda k: sd[k], metadata=sd._metadata)
    ref = io.BytesIO()
    torch.save(sd, ref)
    assert buf.getvalue() == ref.getvalue()


def test_lazy_reader_matches_torch_load(tmp_path) -> None:
    sd = _sample()
    path = tmp_path / "x.ckpt"
    torch.save(
        {"state_dict": sd, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}]}, path
    )
    tf = TorchFile(LocalFile(str(path)))
    lazy = state_dict_of(tf.obj, str(path))
    assert list(lazy) == list(sd)
    for k, v in sd.items():
        if v is None:
            assert lazy[k] is None
        else:
            assert torch.equal(tf.tensor(lazy[k]), v)
    assert dict(lazy._metadata) == dict(sd._metadata)


def test_views_sharing_a_storage_are_read_correctly(tmp_path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"row": base[1], "col": base[:, 2], "t": base.t()}
    path = tmp_path / "v.pt"
    torch.save(sd, path)
    tf = TorchFile(LocalFile(str(path)))
    for k, v in sd.items():
        assert torch.equal(tf.tensor(tf.obj[k]), v)


def test_writer_refuses_a_tensor_that_does_not_match_its_spec(tmp_path) -> None:
    with pytest.raises(CkptError, match="planned"):
        write_state_dict(
            str(tmp_path / "x.ckpt"),
            [("w", TensorSpec(torch.float32, (2,)))],
            lambda k: torch.zeros(3),
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too small"),
        (b"hello world, this is not a checkpoint at all", "not a torch checkpoint"),
        (b"\x80\x02\x8a\x0alegacy pickle bytes follow here....", "legacy"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CkptError, match=message) as info:
        TorchFile(LocalFile(str(path)))
    assert str(path) in str(info.value)


def test_truncated_file_is_refused(tmp_path) -> None:
    path = tmp_path / "t.ckpt"
    torch.save(_sample(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CkptError, match="truncated"):
        TorchFile(LocalFile(str(path)))
    assert os.path.getsize(path) == len(data) // 2
