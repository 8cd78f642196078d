"""The mapped repartition: one Prefect task per target rank file, on threads, Dask or Ray.

``ckptcore.workplan`` cuts a conversion into independent work items, one per target rank file.
Here each item is a task that runs ``ckptcore.api.write_work_item`` where it lands: it opens the
source itself (``s3://`` with ranged reads, or a folder every worker sees), streams its one rank
file straight into the staging location (an upload that completes or is aborted; locally a
temporary name renamed into place) and returns an :class:`ItemResult` saying which worker did it,
how many bytes and how long.

``make_task_runner`` turns a runner spec (``threads[:N]``, ``dask``, ``dask://host:8786``,
``ray``, ``ray://host:10001``) into a Prefect task runner; ``package_staged`` tars a partition
whose members may sit in object storage, streaming them into the ``.nemo`` without a local copy.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from ckptcore import lineage
from ckptcore.api import (
    CONFIG_NAME,
    FetchedCheckpoint,
    FilePlan,
    Plan,
    SourceListing,
    changed_since_listed,
    join,
    member_at,
    package_nemo,
    process_folder,
    put_bytes,
    write_work_item,
)
from ckptcore.errors import CkptError
from tasks import settings
from tasks.convert import PARTITION_MANIFEST, Packaged, Partition, keyed_folder
from tasks.retry import storage_retries

# ------------------------------------------------------------------------------ runners


@dataclass(frozen=True)
class RunnerSpec:
    """A parsed runner: ``kind`` (threads | dask | ray), a scheduler address, a worker count."""

    kind: str
    address: str | None = None
    workers: int | None = None

    def describe(self) -> str:
        if self.kind == "threads":
            return f"ThreadPoolTaskRunner ({self.workers} threads)"
        if self.kind == "dask":
            where = self.address or f"a LocalCluster of {self.workers or 'default'} processes"
            return f"DaskTaskRunner on {where}"
        where = self.address or f"a local Ray cluster ({self.workers or 'all'} CPUs)"
        return f"RayTaskRunner on {where}"


def parse_runner(raw: str, workers: int | None = None) -> RunnerSpec:
    """``threads[:N]`` | ``dask`` | ``dask://host:port`` (``tcp://``, ``tls://``) | ``ray`` |
    ``ray://host:port``; ``workers`` sizes a thread pool, a Dask ``LocalCluster`` or a local
    Ray cluster."""
    raw = raw.strip()
    if raw == "threads" or raw.startswith("threads:"):
        count = raw.partition(":")[2]
        if count and not count.isdigit():
            raise CkptError(None, f"runner {raw!r}: expected threads:N")
        # Prefect's default pool is unbounded: every item at once, each with its buffers
        return RunnerSpec("threads", None, int(count) if count else workers or os.cpu_count() or 1)
    if raw == "dask":
        return RunnerSpec("dask", None, workers)
    if raw.startswith("dask://"):
        return RunnerSpec("dask", "tcp://" + raw[len("dask://") :])
    if raw.startswith(("tcp://", "tls://")):
        return RunnerSpec("dask", raw)
    if raw == "ray":
        return RunnerSpec("ray", None, workers)
    if raw.startswith("ray://"):
        return RunnerSpec("ray", raw)
    raise CkptError(
        None,
        f"runner {raw!r}: expected threads[:N], dask, dask://host:port, ray or ray://host:port",
    )


def local_cluster_kwargs(workers: int | None) -> dict:
    """A ``LocalCluster`` of single-threaded worker processes (one item at a time each: its
    memory stays at the largest tensor it handles), no dashboard."""
    kwargs: dict = {"processes": True, "threads_per_worker": 1, "dashboard_address": None}
    if workers:
        kwargs["n_workers"] = workers
    return kwargs


def make_task_runner(spec: RunnerSpec) -> TaskRunner:
    """The Prefect task runner of a spec (``prefect-dask`` / ``prefect-ray`` imported on demand)."""
    if spec.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=spec.workers)
    if spec.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise CkptError(
                None, "runner 'dask' needs prefect-dask: pip install 'ckpt-pipeline[dask]'"
            ) from None
        if spec.address:
            return DaskTaskRunner(address=spec.address)
        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(spec.workers))
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise CkptError(
            None, "runner 'ray' needs prefect-ray: pip install 'ckpt-pipeline[ray]'"
        ) from None
    if spec.address:
        return RayTaskRunner(address=spec.address)
    # a local cluster, started and stopped with the run: CKPT_RUNNER_WORKERS CPUs, no dashboard
    init: dict = {"include_dashboard": False}
    if spec.workers:
        init["num_cpus"] = spec.workers
    return RayTaskRunner(init_kwargs=init)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: ``VmHWM`` (Linux; unlike ``ru_maxrss`` it does
    not carry over the peak of the process that forked this one), else 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_identity() -> str:
    """Who runs this: the Dask worker's address, the Ray worker id, else host:pid/thread."""
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            return get_worker().address
        except ValueError:  # not inside a Dask worker
            pass
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        return f"ray:{ctx.get_node_id()[:8]}/{ctx.get_worker_id()[:8]}"
    return f"{socket.gethostname()}:{os.getpid()}/{threading.current_thread().name}"


# ------------------------------------------------------------------------------ items


@dataclass(frozen=True)
class SourceObject:
    """What the parent listed for one source file; items check it is still what they read."""

    url: str
    size_bytes: int
    etag: str | None


def source_objects(listing: SourceListing) -> tuple[SourceObject, ...]:
    return tuple(SourceObject(f.url, f.size_bytes, f.etag) for f in listing.files)


def check_unchanged(objects: tuple[SourceObject, ...]) -> None:
    """Fail when a source file changed since it was listed (size, or the ETag of an object)."""
    for obj in objects:
        problem = changed_since_listed(obj.url, obj.size_bytes, obj.etag)
        if problem:
            raise CkptError(obj.url, f"{problem} since the conversion was planned; start it again")


def items_location(staging: str, listing: SourceListing, plan: Plan) -> str:
    """A folder under ``staging`` named by the source's content and the plan: the same inputs
    land in the same place, so a rerun finds the items that already finished."""
    return keyed_folder(staging, "items", [listing.content_key(), plan.digest()])


@dataclass(frozen=True)
class ItemResult:
    """One written target rank file, and who wrote it how fast."""

    member: str  # path inside the .nemo
    url: str
    size_bytes: int
    read_bytes: int  # source bytes the plan reads for it (ckptcore.workplan)
    tensors: int
    worker: str
    seconds: float
    resumed: bool = False  # found complete from an earlier run, not written again
    started: float = 0.0  # time.time() when the task began (to line items up across workers)
    peak_rss_bytes: int = 0  # the worker process's peak resident memory so far


def write_item_file(
    source: str,
    checkpoint: str,
    objects: tuple[SourceObject, ...],
    fp: FilePlan,
    url: str,
    read_bytes: int = 0,
    cache_dir: str | None = None,
) -> ItemResult:
    """:func:`ckptcore.api.write_work_item`, checking first that the source is what the run
    listed (unless the item is found complete), with who ran it and how fast. ``cache_dir``: a
    range cache for what is read (items running beside the flow's verify)."""
    start, started = time.perf_counter(), time.time()
    size, resumed = write_work_item(
        source,
        checkpoint,
        fp,
        url,
        cache=cache_dir,
        part_bytes=settings.upload_chunk_bytes(),
        before_writing=lambda: check_unchanged(objects),
    )
    tensors = sum(1 for t in fp.tensors if t.spec is not None)
    return ItemResult(
        fp.path, url, size, read_bytes, tensors, worker_identity(),
        time.perf_counter() - start, resumed, started, peak_rss_bytes(),
    )  # fmt: skip


@task(
    name="write-item",
    **storage_retries(),
    cache_policy=NONE,
)
def write_item(
    source: str,
    checkpoint: str,
    objects: tuple[SourceObject, ...],
    fp: FilePlan,
    url: str,
    read_bytes: int = 0,
    cache_dir: str | None = None,
) -> ItemResult:
    """One work item: the target rank file ``fp.path`` written to ``url`` (see
    :func:`write_item_file`); memory stays near the largest tensor slice it handles."""
    item = write_item_file(source, checkpoint, objects, fp, url, read_bytes, cache_dir)
    get_run_logger().info(
        "%s: %s bytes %s in %.2f s on %s",
        item.member,
        f"{item.size_bytes:,}",
        "found complete" if item.resumed else "written",
        item.seconds,
        item.worker,
    )
    return item


# ------------------------------------------------------------------------------ staging


def commit_partition(part: Partition, config_yaml: bytes) -> None:
    """``model_config.yaml`` then ``partition.json`` beside the items (the same layout the
    ``repartition/vit`` deployment leaves): the staged folder is a complete extracted .nemo."""
    put_bytes(part.members[CONFIG_NAME], config_yaml)
    put_bytes(
        join(part.url, PARTITION_MANIFEST),
        json.dumps(part.manifest(), indent=2, sort_keys=True).encode(),
    )


def package_staged_partition(
    partition: Partition, record: lineage.LineageRecord, out_path: str
) -> Packaged:
    """The ``.nemo`` at ``out_path``: the partition's members (local, or streamed from object
    storage without a local copy) plus a ``lineage.json`` member."""
    start = time.perf_counter()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    if lineage.MEMBER_NAME in partition.members:
        raise CkptError(partition.url, f"partition already has a {lineage.MEMBER_NAME}")
    files = {m: member_at(u) for m, u in partition.members.items()}
    files[lineage.MEMBER_NAME] = record.to_json().encode("utf-8")
    size = package_nemo(files, out_path, overwrite=True)
    return Packaged(out_path, size, lineage.sha256_file(out_path), time.perf_counter() - start)


@task(name="package")
def package_staged(
    partition: Partition, record: lineage.LineageRecord, work_dir: str, name: str
) -> Packaged:
    """Tar the staged items, ``model_config.yaml`` and the lineage member into
    ``<work_dir>/package-<id>/<name>``."""
    out = os.path.join(process_folder(work_dir, "package"), name)
    return package_staged_partition(partition, record, out)


# ------------------------------------------------------------------------------ the result


@dataclass(frozen=True)
class MappedPartition:
    """What the mapped repartition produced: the staged partition, the source record for the
    lineage (the source read in place: local files by sha256, objects by ETag), and one result
    per item."""

    partition: Partition
    fetched: FetchedCheckpoint
    items: tuple[ItemResult, ...]
    runner: str
    flow_run_id: str | None = None
    flow_run_name: str | None = None

    def note(self) -> str:
        workers = len({i.worker for i in self.items})
        run = f" (run {self.flow_run_name}, {self.flow_run_id})" if self.flow_run_id else ""
        resumed = sum(i.resumed for i in self.items)
        again = f", {resumed} found complete from an earlier run" if resumed else ""
        return (
            f"repartitioned as {len(self.items)} work items on {workers} worker(s) by "
            f"{self.runner}{run}{again}"
        )

    def table(self) -> list[dict]:
        """One row per task: kind, member or file, worker, bytes, seconds (an artifact)."""
        rows = [
            {
                "task": "write-item",
                "what": i.member,
                "worker": i.worker,
                "read_bytes": i.read_bytes,
                "write_bytes": i.size_bytes,
                "seconds": round(i.seconds, 3),
                "resumed": i.resumed,
            }
            for i in self.items
        ]
        return rows
