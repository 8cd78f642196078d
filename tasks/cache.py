"""Cache keys from content digests, and reuse of a cached result only while its files exist."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect.cache_policies import CachePolicy, TaskSource
from prefect.context import TaskRunContext
from prefect.tasks import Task
from prefect.transactions import CommitMode, transaction
from prefect.utilities.hashing import hash_objects

R = TypeVar("R")


def content_token(value: Any) -> Any:
    """What an input contributes to a key: ``value.content_key()`` when it has one, else itself.

    Records of fetched files carry local paths; their ``content_key()`` is the sha256/ETag
    digest of the bytes instead, so the key says what the data is, not where it sits.
    """
    key = getattr(value, "content_key", None)
    return key() if callable(key) else value


@dataclass
class ContentCache(CachePolicy):
    """Key = the inputs' content tokens + the task's source code.

    Plain inputs (target TP/PP, an output location) take part as they are; records with a
    ``content_key()`` (listings, fetched checkpoints) by their content digest.
    """

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        tokens = {name: content_token(value) for name, value in sorted(inputs.items())}
        source = TaskSource().compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return hash_objects(tokens, source, raise_on_failure=True)


def run_cached(task: Task[..., R], is_valid: Callable[[R], bool], *args: Any, **kwargs: Any) -> R:
    """Call ``task``; if its (cached) result points at files that are gone, run it afresh.

    Prefect reuses a persisted result by key alone. Our results name local folders or scratch
    prefixes, which a clean-up or another machine may not have: then the task runs again with
    ``refresh_cache=True`` and its new result replaces the stale one under the same key.

    The result is committed at once, also inside a run's transaction: what a later step's
    failure rolls back (an upload) is not the work a rerun resumes from.
    """
    with transaction(commit_mode=CommitMode.EAGER):
        result = task(*args, **kwargs)
        if is_valid(result):
            return result
        return task.with_options(refresh_cache=True)(*args, **kwargs)
