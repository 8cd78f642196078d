"""An S3 multipart upload of a local file *while another thread writes it*, completed on request.

The writer reports how far the file is written (:meth:`FollowingUpload.written`); a part is read
back (from the page cache) and sent as soon as the writer has passed its end, ``concurrency``
parts at a time, so the upload runs alongside the conversion instead of after it.
:meth:`~FollowingUpload.finish` marks the end of the file, :meth:`~FollowingUpload.wait` returns
once every part is stored, :meth:`~FollowingUpload.commit` completes the upload (the object
appears whole, at once) and :meth:`~FollowingUpload.abort` drops the parts (nothing appears).
Between the end of writing and ``commit`` the caller can check the local file (verify it) while
the last parts are still on their way.

The object's user metadata is fixed when the upload starts (S3 takes it with
``CreateMultipartUpload``), so it can only hold what is known before writing.

A process killed mid-upload leaves the parts stored but invisible: an S3 lifecycle rule
(``AbortIncompleteMultipartUpload``) removes them.

Integrity: with ``checksum="CRC32"`` (the default) the upload is created with S3's additional
checksum: each part carries the CRC-32 computed here from the bytes read back, S3 rejects a part
whose bytes do not match it, the completion names every part's CRC-32 again, and the object keeps
the composite checksum (``HeadObject`` with ``ChecksumMode=ENABLED``). A store that does not
speak S3's additional checksums takes ``checksum=None`` (ETags only, as before).
"""

from __future__ import annotations

import base64
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptcore.errors import CkptError, storage_error
from ckptcore.follow import FollowsWriter
from ckptcore.formats.zipwriter import crc32_bytes

MIN_PART_BYTES = 5 << 20  # S3: every part but the last
MAX_PARTS = 10_000
CHECKSUMS = ("CRC32",)  # S3's additional checksums this module computes


def crc32_b64(data: bytes) -> str:
    """S3's ``ChecksumCRC32`` of ``data``: the big-endian CRC-32, base64."""
    return base64.b64encode(crc32_bytes(data).to_bytes(4, "big")).decode()


def part_size_for(expected_bytes: int, preferred: int) -> int:
    """``preferred``, raised so that ``expected_bytes`` fits in S3's 10,000 parts (with room)."""
    return max(MIN_PART_BYTES, preferred, -(-expected_bytes // (MAX_PARTS - 1000)))


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def s3_target(url: str) -> tuple[Any, str, str]:
    """The s3fs filesystem, bucket and key of an ``s3://`` URL."""
    from ckptcore.storage import get_fs

    if not is_s3(url):
        raise CkptError(url, "a multipart upload needs an s3:// destination")
    fs, path = get_fs(url)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


def create_upload(
    url: str,
    metadata: dict[str, str] | None = None,
    content_type: str | None = None,
    checksum: str | None = "CRC32",
) -> str:
    """Start a multipart upload to ``url``; its upload id. Nothing is visible until
    :func:`complete_upload`."""
    if checksum is not None and checksum not in CHECKSUMS:
        raise CkptError(url, f"checksum {checksum!r}: expected one of {', '.join(CHECKSUMS)}")
    fs, bucket, key = s3_target(url)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if metadata:
        kwargs["Metadata"] = metadata
    if content_type:
        kwargs["ContentType"] = content_type
    if checksum:
        kwargs["ChecksumAlgorithm"] = checksum
    try:
        return fs.call_s3("create_multipart_upload", **kwargs)["UploadId"]
    except Exception as exc:
        raise storage_error(url, "upload failed", exc) from exc


def upload_part(
    url: str, upload_id: str, number: int, data: bytes, checksum: str | None = "CRC32"
) -> dict[str, Any]:
    """Send one part; its entry for the completion (number, ETag, CRC-32 when ``checksum``).
    A store that computed another CRC-32 than the bytes sent have is an error."""
    fs, bucket, key = s3_target(url)
    entry: dict[str, Any] = {"PartNumber": number}
    extra: dict[str, Any] = {}
    if checksum:
        entry["ChecksumCRC32"] = extra["ChecksumCRC32"] = crc32_b64(data)
    reply = fs.call_s3(
        "upload_part",
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        PartNumber=number,
        Body=data,
        **extra,
    )
    entry["ETag"] = reply["ETag"]
    stored = reply.get("ChecksumCRC32")
    if checksum and stored and stored != entry["ChecksumCRC32"]:
        raise CkptError(
            url,
            f"part {number}: the store computed CRC-32 {stored},"
            f" the bytes sent have {entry['ChecksumCRC32']}",
        )
    return entry


def complete_upload(url: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
    """Complete the upload with ``parts`` (sorted here): the object appears whole, at once."""
    fs, bucket, key = s3_target(url)
    try:
        fs.call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])},
        )
    except Exception as exc:
        raise storage_error(url, "upload failed", exc) from exc
    fs.invalidate_cache(f"{bucket}/{key}")


def abort_upload(url: str, upload_id: str) -> None:
    """Drop the upload and its parts (best effort: an upload never completed stays invisible,
    and a lifecycle rule or the next run for ``url`` removes it)."""
    fs, bucket, key = s3_target(url)
    try:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception:
        pass


def composite_crc32(parts: list[dict[str, Any]]) -> str | None:
    """The object's composite CRC-32 as S3 reports it (``HeadObject`` with checksum mode on):
    the CRC-32 of the parts' CRC-32s, base64, then ``-<parts>``; None without checksums."""
    if not parts or any("ChecksumCRC32" not in p for p in parts):
        return None
    ordered = sorted(parts, key=lambda p: p["PartNumber"])
    joined = b"".join(base64.b64decode(p["ChecksumCRC32"]) for p in ordered)
    return f"{crc32_b64(joined)}-{len(ordered)}"


class FollowingUpload(FollowsWriter):
    """Upload ``path`` to ``url`` (``s3://``) by multipart as it grows; see the module doc."""

    def __init__(
        self,
        path: str,
        url: str,
        part_size: int,
        concurrency: int = 4,
        metadata: dict[str, str] | None = None,
        content_type: str | None = None,
        checksum: str | None = "CRC32",
    ) -> None:
        if part_size < MIN_PART_BYTES:
            raise CkptError(url, f"part size {part_size} is below S3's minimum of 5 MiB")
        self.fs, self.bucket, self.key = s3_target(url)
        super().__init__()
        self.path = path
        self.url = url
        self.part_size = part_size
        self._error: BaseException | None = None
        self.checksum = checksum
        self._parts: dict[int, dict[str, Any]] = {}  # part number -> its entry in the completion
        self._futures: list[Future] = []
        self._state = "open"  # open -> committed | aborted
        self.sent_bytes = 0
        self.started = time.perf_counter()
        self.upload_seconds: float | None = None  # start -> the last part stored
        self._last_stored = self.started
        self.upload_id = create_upload(url, metadata, content_type, checksum)
        self._fd = os.open(path, os.O_RDONLY)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="ckpt-part")
        self._dispatcher = threading.Thread(target=self._dispatch, name="ckpt-upload", daemon=True)
        self._dispatcher.start()

    # -- the uploader -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        number, offset = 1, 0
        while True:
            with self._cond:
                end = offset + self.part_size
                while (
                    self._error is None
                    and self._state == "open"
                    and self._written < end
                    and self._size is None
                ):
                    self._cond.wait()
                if self._error is not None or self._state != "open":
                    return
                last = self._size is not None and self._size <= end
                length = (self._size - offset) if last else self.part_size  # type: ignore[operator]
            if length > 0 or number == 1:  # an empty file is one empty part
                self._futures.append(self._pool.submit(self._send, number, offset, length))
            if last:
                return
            number, offset = number + 1, end

    def _send(self, number: int, offset: int, length: int) -> None:
        if self._error is not None or self._state != "open":
            return
        try:
            data = _pread_all(self._fd, offset, length, self.path)
            entry = upload_part(self.url, self.upload_id, number, data, self.checksum)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()
            return
        with self._cond:
            self._parts[number] = entry
            self.sent_bytes += length
            self._last_stored = max(self._last_stored, time.perf_counter())

    # -- the caller's side -----------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> None:
        """Block until every part is stored; the first part's failure is raised here.

        Call it after :meth:`finish` (before, nothing says where the file ends)."""
        if self._size is None and self._error is None and self._state == "open":
            raise CkptError(self.url, "upload waited on before the file was finished")
        self._dispatcher.join(timeout)
        for future in list(self._futures):
            future.result(timeout)
        if self._error is not None:
            raise storage_error(self.url, "upload failed", self._error) from self._error
        if self._size is None or self._state != "open":
            raise CkptError(self.url, f"upload is {self._state}, not finished writing")
        self.upload_seconds = self._last_stored - self.started

    def commit(self) -> None:
        """Complete the upload: the object appears at ``url`` with every part."""
        self.wait()
        complete_upload(self.url, self.upload_id, list(self._parts.values()))
        self._state = "committed"
        self._close()

    def abort(self) -> None:
        """Drop the upload and its parts; nothing appears at ``url``. Safe to call twice."""
        with self._cond:
            if self._state != "open":
                return
            self._state = "aborted"
            self._cond.notify_all()
        self._dispatcher.join()
        for future in list(self._futures):
            future.exception()  # let parts in flight end before the upload goes
        abort_upload(self.url, self.upload_id)
        self._close()

    def composite_checksum(self) -> str | None:
        """The object's composite CRC-32 as S3 reports it (``HeadObject`` with checksum mode on:
        the CRC-32 of the parts' CRC-32s, base64), computed from the bytes sent; None without a
        checksum or before every part is stored."""
        if not self.checksum or self._size is None or len(self._parts) != len(self._futures):
            return None
        composite = composite_crc32(list(self._parts.values()))
        return None if composite is None else composite.split("-")[0]

    @property
    def state(self) -> str:
        return self._state

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pread_all(fd: int, offset: int, length: int, path: str) -> bytes:
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise CkptError(path, f"ends at {offset + done}, before the {length}-byte part")
        chunks.append(chunk)
        done += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
