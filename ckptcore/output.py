"""Destinations: written under a temporary name and committed last, so nothing partial remains.

A local destination ``<dir>/<name>`` is written as ``<dir>/.<name>.tmp-XXXXXXXX``, fsynced and
renamed over ``<name>`` at the end; on any error the work file is removed. For the whole write a
run holds an exclusive lock: ``fcntl.flock`` on ``<dir>/.<name>.lock``, created beside the
destination and removed when the run ends. A second run for the same destination does not wait:
it fails at once with a ``CkptError`` naming the lock and the process holding it. A run killed
with SIGKILL leaves its work file (and the lock file, whose lock died with the process); the next
run for that destination takes the lock and removes them first, so they never accumulate.

Object storage destinations (``s3://...``) have no lock: the archive is streamed as one multipart
upload (``api.package_nemo``), and S3 makes an object visible only when its upload completes. Two
runs writing the same key never interleave bytes; the last upload to complete wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fsspec.callbacks import Callback

from ckptcore.errors import CkptError, StorageError, storage_error, write_error
from ckptcore.storage import get_fs, is_local, local_path

# Files of a source folder that a conversion reads: never replaced by its output.
_SOURCE_FILE = re.compile(r"(\.ckpt|/model_config\.yaml)$")


def same_location(a: str, b: str) -> bool:
    if is_local(a) and is_local(b):
        return os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))
    return a.rstrip("/") == b.rstrip("/")


def _inside_source(dest: str, src: str) -> bool:
    """``dest`` is an existing file the source folder ``src`` reads (a rank file, its config)."""
    if not (is_local(dest) and is_local(src)):
        return False
    folder = os.path.realpath(local_path(src))
    path = os.path.realpath(local_path(dest))
    return (
        os.path.isdir(folder)
        and path.startswith(folder.rstrip("/") + "/")
        and os.path.isfile(path)
        and _SOURCE_FILE.search(path) is not None
    )


def check_destination(dest: str, sources: list[str], overwrite: bool) -> None:
    for src in sources:
        if same_location(dest, src):
            raise CkptError(dest, "destination is the source; write to another path")
        if _inside_source(dest, src):
            raise CkptError(dest, "destination is a file of the source; write to another path")
    fs, path = get_fs(dest)
    try:
        exists = fs.exists(path)
        is_dir = exists and fs.isdir(path)
    except Exception as exc:
        raise storage_error(dest, "cannot check the destination", exc) from exc
    if exists:
        if not overwrite:
            raise CkptError(dest, "destination already exists (pass --overwrite to replace it)")
        if is_dir:
            raise CkptError(dest, "destination is a directory")


def work_files(final: str) -> tuple[str, re.Pattern]:
    """The lock file beside a local destination, and the pattern of its work files."""
    parent, name = os.path.split(final)
    return (
        os.path.join(parent, f".{name}.lock"),
        re.compile(rf"^\.{re.escape(name)}\.tmp-[0-9a-f]{{8}}$"),
    )


def lock_file(path: str, *, blocking: bool = True) -> int | None:
    """An open descriptor of ``path`` holding its exclusive ``flock``, won on the file that is at
    ``path`` now: a holder that finishes may unlink the file it locked, so a lock won on an
    unlinked file is taken again. ``blocking=False``: None at once when another holds it.
    Raises the ``OSError`` of creating the file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def destination_lock(dest: str) -> Iterator[str]:
    """Hold the exclusive lock of the local destination ``dest``; yields the lock file's path.

    Fails at once (``CkptError``) when another process or thread holds it. The lock file is
    removed on release; a lock file whose holder died is taken over.
    """
    final = os.path.abspath(local_path(dest))
    lock, _ = work_files(final)
    try:
        fd = lock_file(lock, blocking=False)
    except OSError as exc:
        raise CkptError(dest, f"cannot create the lock file {lock}: {exc.strerror}") from None
    if fd is None:
        raise CkptError(
            dest,
            f"another run is writing this destination (lock {lock} held{_holder(lock)}); "
            "wait for it to finish or choose another destination",
        )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _holder(lock: str) -> str:
    """`` by process <pid>`` of the lock file's holder, which writes its pid right after it
    takes the lock (waited for briefly), or nothing."""
    for _ in range(100):
        try:
            with open(lock, encoding="ascii") as f:
                return f" by process {int(f.read(32).strip())}"
        except (OSError, ValueError):
            time.sleep(0.01)
    return ""


def remove_stale(final: str) -> list[str]:
    """Remove the work files a killed run left beside ``final`` (call with the lock held)."""
    parent = os.path.dirname(final)
    _, pattern = work_files(final)
    removed = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if pattern.match(name) and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


def new_work_file(final: str) -> str:
    """A fresh work file name beside the local destination ``final`` (the pattern
    :func:`work_files` matches, so a killed writer's is removed by the next)."""
    return os.path.join(
        os.path.dirname(final), f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}"
    )


def fsync_dir(path: str) -> None:
    """Make a rename in the folder ``path`` durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dest: str, sources: list[str] = (), overwrite: bool = False) -> Iterator[str]:
    """Yield a local temporary file path; on success it becomes ``dest`` (rename or upload).

    Local destinations are written under :func:`destination_lock`; see the module docstring.
    A failed write (a full disk, a file-size limit) is a ``CkptError`` and leaves nothing.
    """
    check_destination(dest, list(sources), overwrite)
    if not is_local(dest):
        yield from _remote_output(dest)
        return
    final = os.path.abspath(local_path(dest))
    parent = os.path.dirname(final)
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise CkptError(dest, f"cannot create the destination folder: {exc.strerror}") from None
    with destination_lock(dest):
        check_destination(dest, list(sources), overwrite)  # another run may have committed
        remove_stale(final)
        tmp = new_work_file(final)
        try:
            yield tmp
            os.replace(tmp, final)
            fsync_dir(parent)
        except OSError as exc:
            if exc.filename and os.path.abspath(str(exc.filename)) not in (tmp, final):
                # another file failed (an input being read): name it, not the destination
                raise write_error(str(exc.filename), "failed while writing " + dest, exc) from None
            raise write_error(dest, "cannot write", exc) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _remote_output(dest: str) -> Iterator[str]:
    remove_orphaned_stages()
    fd, tmp = tempfile.mkstemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-upload-", suffix=".tmp")
    os.close(fd)
    try:
        try:
            yield tmp
        except OSError as exc:
            raise write_error(dest, f"cannot write the local copy {tmp}", exc) from None
        put_file(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Advance(Callback):
    """fsspec's progress callback feeding ``on_bytes`` with each increment."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        super().__init__()
        self._on_bytes = on_bytes

    def relative_update(self, inc: int = 1) -> None:
        self._on_bytes(inc)

    def absolute_update(self, value: int) -> None:
        done = self.value
        super().absolute_update(value)
        if value > done:
            self._on_bytes(value - done)


def put_file(
    local: str,
    url: str,
    *,
    metadata: dict[str, str] | None = None,
    content_type: str | None = None,
    part_bytes: int | None = None,
    concurrency: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Copy the local file ``local`` to ``url``, replacing what is there, so that no partial
    object or file is ever visible at ``url``: the one way ckptcore and the pipeline put a
    finished file in place.

    Local: :func:`atomic_output` (the destination's lock, a hidden work file fsynced and
    renamed). S3: a multipart upload above two parts of ``part_bytes`` (an interrupted one
    never becomes an object), ``concurrency`` parts in flight, with user ``metadata``. Other
    fsspec stores: their ``put_file``. ``on_bytes`` hears of each piece sent."""
    advance = on_bytes or (lambda n: None)
    if is_local(url):
        with atomic_output(url, [], overwrite=True) as tmp:
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
                    advance(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
        return
    fs, path = get_fs(url)
    kwargs: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        kwargs.update(
            {k: v for k, v in (("Metadata", metadata), ("ContentType", content_type)) if v}
        )
        if part_bytes:
            kwargs["chunksize"] = part_bytes
        if concurrency:
            kwargs["max_concurrency"] = concurrency
    try:
        fs.put_file(local, path, callback=_Advance(advance), **kwargs)
    except (CkptError, StorageError):
        raise
    except Exception as exc:
        raise storage_error(url, "upload failed", exc) from exc


def put_bytes(url: str, data: bytes) -> None:
    """A small file (a manifest, a config) at ``url``, never seen half written: locally a
    temporary name renamed into place, in object storage one PUT."""
    fs, path = get_fs(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open(path, "wb") as f:
        f.write(data)


def abort_incomplete_uploads(url: str) -> list[str]:
    """Abort the multipart uploads to exactly ``url``'s S3 key that were started and never
    completed nor aborted (a writer killed mid-upload leaves one: it never becomes an object,
    but the store keeps its parts); the upload ids aborted. Nothing for other stores. Call it
    only while no other writer of ``url`` is live (the pipeline holds the destination's
    slot)."""
    if not url.startswith(("s3://", "s3a://")):
        return []
    fs, path = get_fs(url)
    bucket, key, _ = fs.split_path(path)
    aborted: list[str] = []
    page: dict[str, str] = {}
    try:
        while True:
            reply = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **page)
            for upload in reply.get("Uploads", []):
                if upload.get("Key") == key:
                    fs.call_s3(
                        "abort_multipart_upload",
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload["UploadId"],
                    )
                    aborted.append(upload["UploadId"])
            if not reply.get("IsTruncated"):
                return aborted
            page = {
                "KeyMarker": reply.get("NextKeyMarker", ""),
                "UploadIdMarker": reply.get("NextUploadIdMarker", ""),
            }
    except (CkptError, StorageError):
        raise
    except Exception as exc:
        raise storage_error(url, "cannot list or abort its incomplete uploads", exc) from exc


STAGE_PREFIX = "ckpt-stage-"


def process_alive(pid: int) -> bool:
    """Is process ``pid`` running on this machine (another user's counts)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_orphaned_stages(root: str | None = None, prefix: str = STAGE_PREFIX) -> list[str]:
    """Remove the folders and files ``<prefix><pid>-...`` under ``root`` (default: the system's
    temporary folder and the staging prefix) whose process is gone (killed mid-write: its
    ``finally`` never ran); the paths removed. A live (or reused) pid keeps its own."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        match = re.match(rf"^{re.escape(prefix)}(\d+)-", name)
        if match and not process_alive(int(match.group(1))):
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(path)
    return removed


def process_folder(root: str | None = None, kind: str = STAGE_PREFIX.rstrip("-")) -> str:
    """A new folder ``<root>/<kind>-<pid>-<random>`` named by this process (``root``: the
    system's temporary folder); the folders of that kind whose process is gone (a run killed
    before its clean-up) are removed first."""
    root = root or tempfile.gettempdir()
    remove_orphaned_stages(root, f"{kind}-")
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root)


@contextlib.contextmanager
def staging_folder() -> Iterator[str]:
    """A temporary folder for rank files written in parallel (``ckpt-stage-<pid>-<random>``
    in the system's temporary folder), removed afterwards; the folders killed runs left there
    are removed first."""
    path = process_folder()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
