"""Object storage through s3fs against a real local S3 server (moto on 127.0.0.1): selective reads."""

from __future__ import annotations

import os

import pytest
from helpers import bitwise_equal, rank_state_dicts

from ckptcore.api import convert, load_state_dict
from ckptcore.sample import vit_config, write_training_checkpoint
from ckptcore.sources import open_checkpoint
from ckptcore.storage import RemoteFile


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    old = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL_S3",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("ckpts")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
