"""``repartition-items``: the repartition step as one task per target rank file.

``convert`` runs it as a subflow when its ``runner`` parameter names a task runner
(``threads[:N]``, ``dask``, ``dask://host:8786``, ``ray``, ``ray://host:10001``).
"""

from __future__ import annotations

import time

from prefect import flow, runtime, unmapped
from prefect.artifacts import create_table_artifact
from prefect.futures import wait
from prefect.logging import get_run_logger

from ckptcore.api import (
    CONFIG_NAME,
    SourceListing,
    cache_location,
    dump_config,
    is_local,
    join,
    locate_checkpoint,
    open_checkpoint,
    plan_conversion,
    work_items,
)
from ckptcore.lineage import Layout
from tasks import settings
from tasks.convert import Partition
from tasks.items import (
    MappedPartition,
    commit_partition,
    items_location,
    make_task_runner,
    parse_runner,
    source_objects,
    write_item,
)
from tasks.leases import hold


@flow(name="repartition-items", validate_parameters=False)
def repartition_items(
    listing: SourceListing,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    staging: str,
    runner: str = "threads",
    cache_dir: str | None = None,
) -> MappedPartition:
    """Plan here (reading only the source's headers), map ``write-item`` over the plan's files
    (each task opens the source itself and streams its file to ``<staging>/items-<key>/``),
    then commit the partition (``model_config.yaml``, ``partition.json``). Items found complete
    from an earlier run with the same source and plan are not written again. ``runner`` only
    names the runner in the result; ``with_options(task_runner=...)`` chooses it.
    """
    start = time.perf_counter()
    checkpoint = listing.checkpoint or "last"
    with open_checkpoint(listing.root, checkpoint, cache=cache_dir) as ck:
        plan = plan_conversion(ck, target_tp, target_pp, precision)
        planned = work_items(ck, plan, with_ranges=False)
        layout = Layout.of(ck, plan)
    location = items_location(staging, listing, plan)
    hold(location)
    members = {fp.path: join(location, fp.path) for fp in plan.files}
    futures = write_item.map(
        unmapped(listing.root),
        unmapped(checkpoint),
        unmapped(source_objects(listing)),
        list(plan.files),
        list(members.values()),
        [w.read_bytes for w in planned],
        unmapped(cache_dir),
    )
    wait(futures)  # let every item finish before failing on one: a rerun resumes
    items = tuple(f.result() for f in futures)
    partition = Partition(
        url=location,
        members={**members, CONFIG_NAME: join(location, CONFIG_NAME)},
        layout=layout,
        tensor_bytes=sum(fp.write_bytes for fp in plan.files),
        seconds=time.perf_counter() - start,
    )
    commit_partition(partition, dump_config(plan.config))
    run_id = runtime.flow_run.id
    mapped = MappedPartition(
        partition,
        locate_checkpoint(listing, settings.work_dir()),
        items,
        runner,
        str(run_id) if run_id else None,
        runtime.flow_run.name if run_id else None,
    )
    create_table_artifact(mapped.table(), key="work-items", description=mapped.note())
    return mapped


def run_mapped(
    listing: SourceListing,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    runner: str,
    scratch_url: str | None = None,
) -> MappedPartition:
    """``repartition-items`` as a subflow on the task runner ``runner`` names."""
    spec = parse_runner(runner, settings.runner_workers())
    staging = settings.staging_url(scratch_url)
    if spec.address and is_local(staging):
        get_run_logger().warning(
            "items on %s write to the local folder %s: every worker must see it at that path "
            "(set CKPT_STAGING_URL or CKPT_SCRATCH_URL to object storage otherwise)",
            spec.address,
            staging,
        )
    subflow = repartition_items.with_options(task_runner=make_task_runner(spec))
    # threads share this machine with verify: what they fetch, verify then reads locally
    work = settings.work_dir()
    cache = None if listing.local or spec.kind != "threads" else cache_location(listing, work)
    return subflow(listing, target_tp, target_pp, precision, staging, spec.describe(), cache)
