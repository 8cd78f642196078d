"""The pipeline's settings: typed, loaded once per run, a bad value is a one-line CkptError
naming the variable, and a run's lineage keeps them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ckptcore.errors import CkptError
from tasks import settings


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("CKPT_UPLOAD_CHECKSUM", "md5", "expected 'crc32' or 'none'"),
        ("CKPT_UPLOAD_CHUNK_BYTES", "1024", "S3 parts must be >= 5 MiB"),
        ("CKPT_UPLOAD_CONCURRENCY", "0", "must be >= 1"),
        ("CKPT_VERIFY_IMAGES", "many", "is not a number"),
        ("CKPT_RETRY_BACKOFF", "-1", "must be >= 0"),
        ("CKPT_KEEP_WORK", "perhaps", "expected true or false"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch, name, raw, message):
    monkeypatch.setenv(name, raw)
    with pytest.raises(CkptError, match=message) as info:
        settings.load()
    assert name in str(info.value) and "\n" not in str(info.value)


def test_upload_checksum_defaults_to_crc32_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("CKPT_UPLOAD_CHECKSUM", raising=False)
    assert settings.upload_checksum() == "CRC32"
    monkeypatch.setenv("CKPT_UPLOAD_CHECKSUM", "NONE")
    assert settings.upload_checksum() is None
    monkeypatch.setenv("CKPT_UPLOAD_CHECKSUM", " crc32 ")
    assert settings.upload_checksum() == "CRC32"


def test_a_run_reads_its_settings_once(monkeypatch, tmp_path):
    """Pinned for a run, a change of the environment meanwhile does not reach its steps."""
    monkeypatch.setenv("CKPT_UPLOAD_CONCURRENCY", "3")
    with settings.pinned() as config:
        monkeypatch.setenv("CKPT_UPLOAD_CONCURRENCY", "9")
        assert settings.upload_concurrency() == 3 == config.upload_concurrency
        with settings.pinned() as inner:  # a nested run keeps the outer one's
            assert inner is config
    assert settings.upload_concurrency() == 9


def test_the_settings_are_listed_by_a_command(monkeypatch):
    monkeypatch.setenv("CKPT_VERIFY_IMAGES", "2")
    out = subprocess.run(
        [sys.executable, "-m", "tasks.settings"], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["CKPT_" + f.upper() for f in settings.PipelineSettings.model_fields]
    assert any(line.split()[:2] == ["CKPT_VERIFY_IMAGES", "2"] for line in out.splitlines())
    monkeypatch.setenv("CKPT_VERIFY_IMAGES", "0")
    bad = subprocess.run([sys.executable, "-m", "tasks.settings"], capture_output=True, text=True)
    assert (
        bad.returncode == 2 and bad.stderr.count("\n") == 1 and "CKPT_VERIFY_IMAGES" in bad.stderr
    )
