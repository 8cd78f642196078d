"""Small shared test helpers: read a .nemo's per-rank state dicts and compare them bitwise;
a local S3 server."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ckptcore.sources import open_checkpoint


def rank_state_dicts(path: str) -> dict[tuple[int, int], dict]:
    out = {}
    with open_checkpoint(path) as ck:
        for rank, sr in ck.ranks.items():
            out[rank] = {
                k: (None if v is None else sr.tensor(k).clone()) for k, v in sr.state.items()
            }
    return out


def bitwise_equal(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x is None or y is None:
            if x is not y:
                return False
            continue
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(
            x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        ):
            return False
    return True


_AWS_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


@contextlib.contextmanager
def local_s3(*buckets: str) -> Iterator:
    """moto's S3 server on 127.0.0.1 (a free port) with ``buckets``; yields an s3fs filesystem
    on it. s3fs finds it through the environment, restored afterwards."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    old = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = s3fs.S3FileSystem()
        for bucket in buckets:
            fs.mkdir(bucket)
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_files_under(folder: str) -> list[str]:
    """The files under ``folder`` this process holds open (from ``/proc/self/fd``)."""
    root = os.path.realpath(folder) + os.sep
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(root) or target.removesuffix(" (deleted)").startswith(root):
                held.append(target)
    return held
