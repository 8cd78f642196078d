"""The one error type of ckptcore: a user-facing problem with a file, a key, or a parameter."""

from __future__ import annotations


class CkptError(Exception):
    """A problem with the user's input, reported as one line: ``<path>: <key>: <problem>``.

    Anything else raised from ckptcore is a bug and keeps its traceback.
    """

    def __init__(self, path: str | None, problem: str, key: str | None = None) -> None:
        self.path = path
        self.problem = problem
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.path, self.key) if p]
        parts.append(self.problem)
        return ": ".join(parts)

    def __reduce__(self):  # picklable across process pools
        return (CkptError, (self.path, self.problem, self.key))
