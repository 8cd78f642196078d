"""``api.verify`` in a child Python process started ahead of time.

Verifying needs torch and the reference model, ~2 s of imports on a small machine that a
conversion itself does not need (its engine moves bytes, not tensors). Started when a run
begins, the child imports them while the run lists and opens its source, and waits; when the
output is written, :meth:`VerifyProcess.verify` hands it the paths and gets the report back.
The import then costs the run no time, and it never holds the parent's GIL (a helper thread
did: it slowed the very steps it was meant to overlap).

The child reads one JSON request per line on stdin and answers one JSON line on a dedicated
pipe (its stdout goes to stderr, so nothing a library prints can garble an answer). A
``CkptError`` or ``StorageError`` in the child is raised again here, as itself; anything else
as a ``RuntimeError`` with the child's traceback. Each request carries the parent's current
``AWS_*``/``CKPT_*``/``FSSPEC_*`` settings, and the child lists storage anew, so one child can
serve several runs. The child exits when its stdin closes, so it never outlives the process
that started it.

Given the URLs a run will verify (``warm``), the child also asks their stores once after its
imports: a first request in a process pays for the storage client (for S3: the botocore
session, service model and connection, ~0.4 s of a 0.7 s verify of a tiny checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ckptcore import settings
from ckptcore.errors import CkptError, StorageError

if TYPE_CHECKING:
    from ckptcore.api import VerifyReport

__all__ = ["VerifyProcess", "VerifyProcessGone"]


class VerifyProcessGone(RuntimeError):
    """The child had exited before a request was sent (verify in this process instead)."""


class VerifyProcess:
    """A child process ready to run :func:`ckptcore.api.verify`; one request at a time."""

    def __init__(self, warm: Sequence[str] = ()) -> None:
        """Start the child; ``warm``: URLs whose stores it asks once while idle."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = settings.environment()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "ckptcore.verify_process", *warm],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def verify(
        self,
        a: str,
        b: str,
        tolerance: float = 1e-5,
        images: int = 4,
        device: str | None = None,
        cache: str | None = None,
        run_both: bool = False,
    ) -> VerifyReport:
        """:func:`ckptcore.api.verify` with these arguments, run in the child; its report.

        ``cache`` is the range cache's folder (the child opens it again). Raises
        :class:`VerifyProcessGone` if the child is gone before the request is sent."""
        from ckptcore.api import VerifyReport  # noqa: F811 - at run time, not only for typing

        request = dict(
            a=a, b=b, tolerance=tolerance, images=images, device=device, cache=cache,
            run_both=run_both,
        )  # fmt: skip
        request["env"] = settings.passed_on()
        with self._lock:
            stdin, stdout = self._proc.stdin, self._proc.stdout
            assert stdin is not None and stdout is not None
            try:
                if self._proc.poll() is not None:
                    raise BrokenPipeError
                stdin.write(json.dumps(request) + "\n")
                stdin.flush()
            except (BrokenPipeError, ValueError, OSError) as e:
                raise VerifyProcessGone(
                    f"the verify process {self._proc.pid} exited with {self._proc.poll()}"
                ) from e
            line = stdout.readline()
            if not line:
                code = self._proc.wait()
                raise RuntimeError(f"the verify process exited with {code} while verifying {b}")
        answer = json.loads(line)
        if "report" in answer:
            return VerifyReport(**answer["report"])
        error = answer.get("error")
        if error == "CkptError":
            raise CkptError(answer["path"], answer["problem"], answer.get("key"))
        if error == "StorageError":
            raise StorageError(answer["path"], answer["problem"])
        raise RuntimeError(f"verify failed in its process:\n{answer.get('traceback', answer)}")

    def close(self, timeout: float = 5.0, wait: bool = True) -> None:
        """Let the child exit (stdin closed), killing it if it does not within ``timeout``;
        ``wait=False``: return at once, a helper thread waits for it."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        if wait:
            self._reap(timeout)
        else:
            threading.Thread(target=self._reap, args=(timeout,), daemon=True).start()

    def _reap(self, timeout: float) -> None:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> VerifyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _take_env(env: dict[str, str]) -> None:
    """The parent's storage and pipeline settings as of this request (a process that serves
    several runs must not keep the first one's endpoint or credentials)."""
    changed = settings.take_environment(env)
    if changed:  # filesystems are cached per class with what they were made with
        import fsspec

        todo = [fsspec.AbstractFileSystem]
        while todo:
            cls = todo.pop()
            cls.clear_instance_cache()
            todo.extend(cls.__subclasses__())


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    from ckptcore import api
    from ckptcore.storage import forget_listings

    try:
        _take_env(request.pop("env", {}))
        for url in (request["a"], request["b"]):  # a process serving several runs lists anew
            forget_listings(url)
        return {"report": api.verify(**request).to_dict()}
    except CkptError as e:
        return {"error": "CkptError", "path": e.path, "problem": e.problem, "key": e.key}
    except StorageError as e:
        return {"error": "StorageError", "path": e.path, "problem": e.problem}
    except Exception:  # noqa: BLE001 - a bug: the parent raises it with this traceback
        return {"error": "bug", "traceback": traceback.format_exc()}


def _warm(urls: Sequence[str]) -> None:
    """Ask each remote URL's store once (its client made, a connection open); errors are the
    request's to report, not this."""
    from ckptcore.storage import get_fs, is_local

    for url in urls:
        if is_local(url):
            continue
        try:
            fs, path = get_fs(url)
            fs.exists(path)
        except Exception:  # noqa: BLE001, S110 - only a head start
            pass


def _serve(warm: Sequence[str]) -> int:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints go to stderr, not the answers
    import torch  # noqa: F401 - the point: imported while the parent still works

    import ckptcore.api  # noqa: F401
    import ckptcore.model.vit  # noqa: F401

    _warm(warm)

    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(_answer(json.loads(line))) + "\n")
            answers.flush()
            _give_back_memory()  # idle until the next request: hold no model meanwhile
    return 0


def _give_back_memory() -> None:
    """Free what the last request left (the model's tensors) and return it to the system:
    glibc keeps freed heap memory otherwise, and an idle verify process would hold it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        pass


if __name__ == "__main__":
    try:
        code = _serve(sys.argv[1:])
    except KeyboardInterrupt:  # the parent's terminal was interrupted: it reports that
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (torch's takes a while): nothing is left to save
