"""Destinations: written under a temporary name and committed last, so nothing partial remains."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator

from ckptcore.errors import CkptError
from ckptcore.storage import get_fs, is_local, local_path


def same_location(a: str, b: str) -> bool:
    if is_local(a) and is_local(b):
        return os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))
    return a.rstrip("/") == b.rstrip("/")


def check_destination(dest: str, sources: list[str], overwrite: bool) -> None:
    for src in sources:
        if same_location(dest, src):
            raise CkptError(dest, "destination is the source; write to another path")
    fs, path = get_fs(dest)
    if fs.exists(path):
        if not overwrite:
            raise CkptError(dest, "destination already exists (pass --overwrite to replace it)")
        if fs.isdir(path):
            raise CkptError(dest, "destination is a directory")


@contextlib.contextmanager
def atomic_output(dest: str, sources: list[str] = (), overwrite: bool = False) -> Iterator[str]:
    """Yield a local temporary file path; on success it becomes ``dest`` (rename or upload)."""
    check_destination(dest, list(sources), overwrite)
    if is_local(dest):
        final = os.path.abspath(local_path(dest))
        parent = os.path.dirname(final)
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise CkptError(
                    dest, f"cannot create the destination folder: {exc.strerror}"
                ) from None
        tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            yield tmp
            os.replace(tmp, final)
        except OSError as exc:
            raise CkptError(dest, f"cannot write: {exc.strerror or exc}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fd, tmp = tempfile.mkstemp(prefix="ckpt-upload-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        fs, path = get_fs(dest)
        fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
