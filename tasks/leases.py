"""Work folders that runs share: each run holds the ones it uses, and a folder is removed only
when no other live run holds it.

Work folders are named by content (``fetch-``, ``cache-``, ``partition-`` + a digest of what the
source is), so a rerun finds what a failed run left and resumes from it. The same naming makes
runs over identical bytes (a retry racing its original, the same checkpoint under two prefixes,
a job that announces twice) use the same folders at the same time; without holds, the first to
finish removed them while the others still read them.

A hold is a file ``<folder>.holders/<token>`` naming the root flow run and the process. Holding and
releasing take ``<folder>.holders/.lock`` (``flock``), so a folder is never removed between
another run's hold and its first read. A holder is alive while: in this process, it has not
released; on this host, its process still runs (pid and start time); on another host (a shared
folder), always: only that host can tell.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator

from ckptcore.api import is_local, local_path, lock_file, process_alive

HOLDERS = ".holders"
_LOCK = ".lock"
_HELD: dict[str, set[str]] = {}  # token -> folders a run in this process holds
_HELD_LOCK = threading.Lock()


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), where /proc says; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _run_id() -> str:
    """The run that holds: the root flow run (a subflow's holds are its parent's, as they run in
    the same process and the parent cleans up)."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.root_flow_run_id or flow_run.id or "")
    except Exception:  # no Prefect run context: the process alone identifies the holder
        return ""


def _me() -> dict[str, object]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": _start_time(pid),
        "run": _run_id(),
    }


def _token(holder: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(holder, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[str]:
    """``<folder>.holders``, locked. The last release removes that folder, lock file included:
    a run that was waiting on the removed lock file takes a new one."""
    holders = folder.rstrip("/") + HOLDERS
    while True:
        os.makedirs(holders, exist_ok=True)
        try:
            fd = lock_file(os.path.join(holders, _LOCK))  # blocking: never None
            break
        except FileNotFoundError:  # the folder went between makedirs and open
            continue
    try:
        yield holders
    finally:
        os.close(fd)


def _alive(holder: dict[str, object], token: str) -> bool:
    me = _me()
    if holder.get("host") != me["host"]:
        return True
    if holder.get("pid") == me["pid"] and holder.get("start") == me["start"]:
        with _HELD_LOCK:
            return bool(_HELD.get(token))
    pid = holder.get("pid")
    if not isinstance(pid, int) or not process_alive(pid):
        return False
    return _start_time(pid) == holder.get("start")


def hold(folder: str) -> None:
    """This run uses the local work folder ``folder``: no other run removes it meanwhile.
    Object-storage URLs are left alone (their runs own their prefixes)."""
    if not is_local(folder):
        return
    folder = os.path.abspath(local_path(folder))
    holder = _me()
    token = _token(holder)
    with _locked(folder) as holders:
        with open(os.path.join(holders, token), "w", encoding="utf-8") as f:
            json.dump(holder, f)
        with _HELD_LOCK:
            _HELD.setdefault(token, set()).add(folder)


def _forget(token: str, folder: str) -> None:
    with _HELD_LOCK:
        folders = _HELD.get(token)
        if folders is not None:
            folders.discard(folder)
            if not folders:
                del _HELD[token]


@contextlib.contextmanager
def run_holds() -> Iterator[None]:
    """Around a flow run's body: when it ends (done, failed or cancelled), whatever it still
    holds is let go without being removed. A failed run's folders stay for its rerun to resume
    from; they are no longer held, so the next run over the same bytes may clean them up."""
    try:
        yield
    finally:
        token = _token(_me())
        with _HELD_LOCK:
            folders = sorted(_HELD.get(token, ()))
        for folder in folders:
            with _locked(folder) as holders:
                _forget(token, folder)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(holders, token))
                if set(os.listdir(holders)) <= {_LOCK}:
                    shutil.rmtree(holders, ignore_errors=True)


def release(folder: str) -> bool:
    """This run is done with ``folder``: remove it, unless another live run holds it. True if
    it was removed (or was not there), False if it was kept for another run."""
    folder = os.path.abspath(local_path(folder))
    mine = _token(_me())
    with _locked(folder) as holders:
        _forget(mine, folder)
        others = 0
        for name in os.listdir(holders):
            if name == _LOCK:
                continue
            path = os.path.join(holders, name)
            try:
                with open(path, encoding="utf-8") as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}
            if name != mine and isinstance(holder, dict) and _alive(holder, name):
                others += 1
            else:
                os.unlink(path)  # ours, or a run that is gone
        if others:
            return False
        if os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
        elif os.path.exists(folder):
            os.unlink(folder)
        shutil.rmtree(holders, ignore_errors=True)
    return True
