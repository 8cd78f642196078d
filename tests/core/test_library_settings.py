"""ckptcore's settings: read from the environment in one place, overridden in-process by the CLI."""

from __future__ import annotations

import threading

import pytest

from ckptcore import settings
from ckptcore.errors import CkptError
from ckptcore.formats.nemo import FIXED_MTIME, default_mtime
from ckptcore.storage import read_concurrency


def test_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("CKPT_READ_CONCURRENCY", raising=False)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert settings.current() == settings.Settings(4, None)
    assert default_mtime() == FIXED_MTIME
    monkeypatch.setenv("CKPT_READ_CONCURRENCY", "9")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert (read_concurrency(), default_mtime()) == (9, 1700000000)
    monkeypatch.setenv("CKPT_READ_CONCURRENCY", "65")
    with pytest.raises(
        CkptError, match="CKPT_READ_CONCURRENCY='65': expected a whole number 1..64"
    ):
        settings.current()


def test_using_overrides_in_every_thread_then_restores(monkeypatch) -> None:
    monkeypatch.setenv("CKPT_READ_CONCURRENCY", "3")
    seen = []
    with settings.using(read_concurrency=2):
        thread = threading.Thread(target=lambda: seen.append(read_concurrency()))
        thread.start()
        thread.join()
        assert read_concurrency() == 2
    assert seen == [2] and read_concurrency() == 3


def test_child_environment_round_trip(monkeypatch) -> None:
    monkeypatch.setenv("CKPT_TEST_ONLY", "a")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    env = settings.passed_on()
    assert env["CKPT_TEST_ONLY"] == "a" and env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:1"
    assert "PATH" not in env
    monkeypatch.setenv("CKPT_TEST_ONLY", "b")
    assert settings.take_environment(env) and settings.passed_on() == env
    assert not settings.take_environment(env)
