"""Shared pieces of the hostile-input suite: run the CLI, build bad files, check nothing changed.

Every bad-input case goes through ``ckptcore.cli.main`` in this process (the CLI's own code path,
without an interpreter start per case) and asserts the exact one-line message, the exit status,
that nothing appeared at the destination and that the source is byte-for-byte unchanged. A few
cases also run ``python -m ckptcore.cli`` in a subprocess (see :func:`ckpt_proc`).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from cli_runner import run_cli  # noqa: F401  (re-exported to the hostile tests)

from ckptcore.sample import vit_config

ROOT = Path(__file__).resolve().parents[2]
CFG = vit_config("tiny")  # hidden 64, 2 layers, 4 heads, ffn 256: a few hundred KiB per file


# --------------------------------------------------------------------------- running the CLI


def ckpt_proc(
    *args: str, env: dict | None = None, timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """``python -m ckptcore.cli ARGS`` in a subprocess."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "ckptcore.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        **kwargs,
    )


def tree_digest(path: str | Path) -> dict[str, str]:
    """{relative name: sha256} of a file or of every file and link under a folder."""
    path = Path(path)
    if not os.path.lexists(path):
        return {}
    if path.is_file() and not path.is_symlink():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            p = Path(root) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: str | Path) -> list[str]:
    """Names in ``folder`` (the destination's parent) after a failed run: should be none."""
    folder = Path(folder)
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def assert_refused(
    argv: list, expected: str, dest: str | Path | None = None, sources: tuple = ()
) -> None:
    """``ckpt ARGV`` exits 2 with exactly ``ckpt: error: EXPECTED`` on one stderr line, writes
    nothing at ``dest`` (or beside it) and leaves every path in ``sources`` unchanged."""
    before = {str(s): tree_digest(s) for s in sources}
    parent_before = leftovers(Path(dest).parent) if dest is not None else []
    rc, out, err = run_cli(*argv)
    assert err == f"ckpt: error: {expected}\n", err
    assert rc == 2 and out == ""
    if dest is not None:
        assert not os.path.lexists(dest)
        assert leftovers(Path(dest).parent) == parent_before
    for s, digest in before.items():
        assert tree_digest(s) == digest, f"{s} changed"


def assert_proc_refused(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.stderr == f"ckpt: error: {expected}\n", proc.stderr
    assert proc.returncode == 2 and proc.stdout == ""


# --------------------------------------------------------------------------- building bad files


def copy(src: str | Path, dst: str | Path) -> Path:
    """A private copy of a template file or folder."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def nemo_members(path: str | Path) -> dict[str, bytes]:
    """{member name: bytes} of the regular files of an uncompressed tar."""
    with tarfile.open(path, "r:") as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def write_tar(path: str | Path, members: list, mode: str = "w") -> Path:
    """A tar of ``members``: (name, bytes) for files, or ready-made ``TarInfo`` (links, devices)."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for item in members:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
                continue
            name, data = item
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return Path(path)


def special_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info


# --------------------------------------------------------------------------- hostile pickles


class RunsSystem:
    """``os.system(...)`` when unpickled by a loader that resolves any global."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Evals:
    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class Execs:
    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _UnknownModuleGlobal:
    """Pickles as ``GLOBAL hostile_payload_mod Payload`` + REDUCE: importing that module runs it."""

    def __reduce__(self):
        return (_Named("hostile_payload_mod", "Payload"), ())


class _Named:
    def __init__(self, module: str, name: str) -> None:
        self.__module__ = module
        self.__qualname__ = self.__name__ = name

    def __call__(self):  # pragma: no cover - never called
        raise AssertionError


def _pickle_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


class _PayloadPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes ``_Named`` markers as plain GLOBAL opcodes (their module need not exist)."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_named(self, obj: _Named) -> None:
        self.write(_pickle_global(obj.__module__, obj.__name__))

    dispatch[_Named] = save_named


UNKNOWN_MODULE_SOURCE = """\
import pathlib, os
pathlib.Path(os.environ["HOSTILE_MARKER"]).touch()

class Payload:
    pass
"""


def payload(kind: str, marker: str | Path):
    """An object whose unpickling would run code (or import an unknown module)."""
    if kind == "os.system":
        return RunsSystem(marker)
    if kind == "eval":
        return Evals(marker)
    if kind == "builtins.exec":
        return Execs(marker)
    if kind == "unknown module":
        return _UnknownModuleGlobal()
    raise AssertionError(kind)


PAYLOAD_GLOBAL = {
    "os.system": "posix.system",
    "eval": "builtins.eval",
    "builtins.exec": "builtins.exec",
    "unknown module": "hostile_payload_mod.Payload",
}


def save_with_payload(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` where ``obj`` may hold payload objects (written by a permissive pickler)."""
    # torch.save takes a pickle_module: one whose Pickler writes the unknown-module marker
    module = type(sys)("payload_pickle")
    module.__dict__.update(pickle.__dict__)
    module.Pickler = _PayloadPickler  # type: ignore[attr-defined]
    torch.save(obj, str(path), pickle_module=module)
    return Path(path)
