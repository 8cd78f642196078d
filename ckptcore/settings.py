"""ckptcore's settings: the one module of ckptcore that reads the process environment.

| setting | variable | default | meaning |
|---|---|---|---|
| ``read_concurrency`` | ``CKPT_READ_CONCURRENCY`` | 4 | ranged GETs in flight per remote object (1..64) |
| ``source_date_epoch`` | ``SOURCE_DATE_EPOCH`` | none: a fixed date | member times of written archives |

:func:`current` is what ckptcore uses: the values :func:`using` set (the ``ckpt`` command passes
its options this way), else the environment's. The environment a child process needs of this
one (storage endpoints and credentials, these settings) is passed on through
:func:`passed_on` / :func:`take_environment`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ckptcore.errors import CkptError


@dataclass(frozen=True)
class Settings:
    read_concurrency: int = 4
    source_date_epoch: int | None = None


VARIABLES = {
    "read_concurrency": ("CKPT_READ_CONCURRENCY", "ranged GETs in flight per remote object, 1..64"),
    "source_date_epoch": ("SOURCE_DATE_EPOCH", "member times of written archives (Unix time)"),
}


def from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings the environment gives; a malformed value is a ``CkptError`` naming it."""
    env = os.environ if environ is None else environ
    values: dict[str, int | None] = {}
    raw = env.get("CKPT_READ_CONCURRENCY", "").strip()
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= 64:
            raise CkptError(None, f"CKPT_READ_CONCURRENCY={raw!r}: expected a whole number 1..64")
        values["read_concurrency"] = int(raw)
    raw = env.get("SOURCE_DATE_EPOCH", "").strip()
    if raw.isdigit():
        values["source_date_epoch"] = int(raw)
    return Settings(**values)


_OVERRIDE: Settings | None = None
_OVERRIDE_LOCK = threading.Lock()


def current() -> Settings:
    """The settings in force: :func:`using`'s, else the environment's (read at each call, so
    a process serving several runs sees each run's)."""
    override = _OVERRIDE
    return override if override is not None else from_environment()


@contextlib.contextmanager
def using(**changes: int | None) -> Iterator[Settings]:
    """Within the block, :func:`current` answers these values (the rest from the environment),
    in every thread of the process; afterwards what was in force before."""
    global _OVERRIDE
    with _OVERRIDE_LOCK:
        before = _OVERRIDE
        chosen = dataclasses.replace(current(), **changes)
        _OVERRIDE = chosen
    try:
        yield chosen
    finally:
        with _OVERRIDE_LOCK:
            _OVERRIDE = before


def describe() -> str:
    """The settings as ``ckpt --help`` lists them."""
    default = Settings()
    return "\n".join(
        f"  {variable:<24}{meaning} (default: {getattr(default, name) or 'unset'})"
        for name, (variable, meaning) in VARIABLES.items()
    )


# What a child process (the verify process) is given of this one's environment.
PASSED_ON = ("AWS_", "CKPT_", "FSSPEC_")  # storage endpoints, credentials, these settings


def environment() -> dict[str, str]:
    """A copy of this process's environment, to start a child process with."""
    return dict(os.environ)


def passed_on() -> dict[str, str]:
    """The variables a child that serves this process's runs must use: storage endpoints and
    credentials, and ckptcore's and the pipeline's settings, as they are now."""
    return {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}


def take_environment(env: Mapping[str, str]) -> bool:
    """Make this process's passed-on variables exactly ``env``'s; whether anything changed."""
    changed = False
    for key in [k for k in os.environ if k.startswith(PASSED_ON) and k not in env]:
        del os.environ[key]
        changed = True
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
            changed = True
    return changed
