"""moto's S3 server, optionally with ranged GETs that read only the range.

Stock moto answers a ranged GET by reading the whole object and slicing it: a 1 MiB range of a
900 MB object costs as much as the whole object (~0.5 s here), so a client that reads many
ranges of big objects measures moto, not itself. Real S3 (and MinIO) cost about the range.

``python bench/moto_ranges.py -H 127.0.0.1 -p PORT [--fast-ranges]`` runs moto's own server
(``moto.server.main``); with ``--fast-ranges`` a GET with a ``Range`` header reads just those
bytes from the object's spool file (``os.pread``, no shared file position). Everything else,
including whole-object GETs, the answers' headers and error cases, is moto's code unchanged.
For benchmarks only.
"""

from __future__ import annotations

import os
import sys
import threading

_lazy = threading.local()


class RangeReader:
    """Stands in for ``FakeKey.value`` in a ranged GET: ``len()`` and slices without reading
    the rest of the object."""

    def __init__(self, key) -> None:
        self._key = key

    def __len__(self) -> int:
        return self._key.size

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, s):
        if not isinstance(s, slice) or s.step not in (None, 1):
            return self.materialize()[s]
        start, stop, _ = s.indices(len(self))
        n = max(0, stop - start)
        key = self._key
        with key.lock:
            buf = key._value_buffer
            if not getattr(buf, "_rolled", False):  # still in memory (small objects)
                with buf._file.getbuffer() as view:
                    return bytes(view[start:stop])
            buf.flush()
            fd = buf.fileno()
        parts, done = [], 0
        while done < n:
            chunk = os.pread(fd, n - done, start + done)
            if not chunk:
                break
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def materialize(self) -> bytes:
        return self._key.value


def install() -> None:
    from moto.s3 import models, responses

    value = models.FakeKey.value

    def lazy_value(self):
        return RangeReader(self) if getattr(_lazy, "on", False) else value.fget(self)

    models.FakeKey.value = property(lazy_value, value.fset)

    get_object = responses.S3Response.get_object

    def ranged_get_object(self):
        _lazy.on = bool(self.headers.get("range"))
        try:
            return get_object(self)
        finally:
            _lazy.on = False

    responses.S3Response.get_object = ranged_get_object

    key_response = responses.S3Response.key_response

    def materializing_key_response(self, *args, **kwargs):
        status, headers, body = key_response(self, *args, **kwargs)
        if isinstance(body, RangeReader):  # a range moto did not slice (unparsable, whole)
            body = body.materialize()
        return status, headers, body

    responses.S3Response.key_response = materializing_key_response


def main(argv: list[str]) -> None:
    if "--fast-ranges" in argv:
        argv = [a for a in argv if a != "--fast-ranges"]
        install()
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
