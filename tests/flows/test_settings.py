"""The pipeline's settings: defaults, and a bad value is a one-line CkptError naming the variable."""

from __future__ import annotations

import pytest

from ckptcore.errors import CkptError
from tasks import settings


@pytest.mark.parametrize(
    "name, raw, read, message",
    [
        ("CKPT_UPLOAD", "later", settings.upload_mode, "expected stream or after"),
        ("CKPT_UPLOAD_CHECKSUM", "md5", settings.upload_checksum, "expected crc32 or none"),
        ("CKPT_UPLOAD_CHUNK_BYTES", "1024", settings.upload_chunk_bytes, "must be >= 5 MiB"),
        ("CKPT_UPLOAD_CONCURRENCY", "0", settings.upload_concurrency, "must be at least 1"),
        ("CKPT_VERIFY_IMAGES", "many", settings.verify_images, "is not a number"),
        ("CKPT_VERIFY_PROCESS", "child", settings.verify_process, "expected auto, warm or inline"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch, name, raw, read, message):
    monkeypatch.setenv(name, raw)
    with pytest.raises(CkptError, match=message) as info:
        read()
    assert name in str(info.value) and "\n" not in str(info.value)


def test_upload_checksum_defaults_to_crc32_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("CKPT_UPLOAD_CHECKSUM", raising=False)
    assert settings.upload_checksum() == "CRC32"
    monkeypatch.setenv("CKPT_UPLOAD_CHECKSUM", "NONE")
    assert settings.upload_checksum() is None
    monkeypatch.setenv("CKPT_UPLOAD_CHECKSUM", " crc32 ")
    assert settings.upload_checksum() == "CRC32"
