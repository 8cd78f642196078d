"""Benchmark: one conversion's work items spread over Dask workers (the mapped mode of ``convert``).

Makes a training checkpoint (ViT-Large width, with optimizer state) with ckptcore's generator, puts
it in a moto S3 server (its own process, 127.0.0.1), then runs the ``repartition-items`` subflow of
``flows/convert.py`` once per runner: ``threads:1`` (one worker, in-process) and ``DaskTaskRunner``
on a ``LocalCluster`` of N single-threaded worker processes. Each ``write-item`` task reads its
byte ranges of the source from S3 and writes its one target rank file to a fresh staging prefix
(the source files are identified by their ETags; nothing else reads them). Every task reports the
worker that ran it (the Dask worker's address), its start time, bytes, seconds and the worker's
peak RSS.

Prints markdown tables (per run, per worker, per item) and writes ``bench/out/scaleout.json``.
The estimate column is ``ckptcore.workplan.estimate`` for the plan's items with the per-worker
bandwidth the one-worker run measured.

Caveats. moto answers a ranged GET by reading the whole object (a 1 MiB range of a 320 MiB object
takes ~200 ms here, of a 1 MiB object ~7 ms), and it shares the machine's cores with the workers:
with moto, the tables measure moto. Point ``AWS_ENDPOINT_URL_S3`` at a real S3 (MinIO, a bucket)
to measure the pipeline, or use ``--storage local`` (a folder every worker sees, like NFS/Lustre).
On a 2-core machine expect no speed-up past 2 workers: the point is where items go, what each
costs, and that a worker's memory stays flat.

Usage: ``python bench/scaleout_bench.py [--layers 4] [--source-tp 2] [--target-tp 2]
[--target-pp 2] [--workers 1,2] [--storage s3|local]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MB = 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """moto's S3 server in its own process (so it does not share a GIL with the flow); an
    ``AWS_ENDPOINT_URL_S3`` already set means "use that S3" (MinIO, a real bucket)."""
    if os.environ.get("AWS_ENDPOINT_URL_S3"):
        yield os.environ["AWS_ENDPOINT_URL_S3"]
        return
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start")
        os.environ["AWS_ENDPOINT_URL_S3"] = url  # before any s3fs client or Dask worker exists
        for key, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            os.environ.setdefault(key, value)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def prefect_api():
    """The API in ``PREFECT_API_URL`` if set, else a temporary server (the test harness)."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_source(work: str, args, storage: str) -> tuple[str, str]:
    """A training checkpoint; returns (local folder, URL the flow reads)."""
    from ckptcore.sample import vit_config, write_training_checkpoint

    local = os.path.join(work, "train", "checkpoints")
    cfg = vit_config("large", layers=args.layers)
    write_training_checkpoint(local, cfg, tp=args.source_tp, pp=args.source_pp, step=100)
    if storage == "local":
        return local, local
    import fsspec

    fs = fsspec.filesystem("s3")
    for bucket in ("ckpt-training", "ckpt-scratch"):
        fs.mkdir(bucket)
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    fs.put(local + "/", f"ckpt-training/{prefix}/checkpoints/", recursive=True)
    return local, f"s3://ckpt-training/{prefix}/checkpoints"


def run_once(listing, args, runner: str, workers: int, staging: str) -> dict:
    from flows.repartition_items import repartition_items
    from tasks.items import make_task_runner, parse_runner

    spec = parse_runner(runner, workers)
    flow = repartition_items.with_options(task_runner=make_task_runner(spec))
    t0 = time.time()
    mapped = flow(listing, args.target_tp, args.target_pp, "keep", staging, spec.describe())
    wall = time.time() - t0
    tasks = [
        {
            "task": "write-item",
            "what": i.member,
            "worker": i.worker,
            "read": i.read_bytes,
            "write": i.size_bytes,
            "start": i.started,
            "seconds": i.seconds,
            "rss": i.peak_rss_bytes,
        }
        for i in mapped.items
    ]
    first = min(t["start"] for t in tasks)
    span = max(t["start"] + t["seconds"] for t in tasks) - first
    for t in tasks:
        t["start"] -= first
    return {
        "runner": spec.describe(),
        "workers": workers,
        "wall": wall,
        "span": span,
        "tasks": tasks,
    }


def _fmt_worker(w: str) -> str:
    return w.replace("tcp://127.0.0.1:", "dask:")


def report(runs: list[dict], estimates: dict[int, float]) -> str:
    out = ["## Runs", ""]
    out += [
        "| runner | workers | items | item MB read | item MB written | wall s (incl. start) | tasks span s | MB/s (span) | estimate s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in runs:
        items = [t for t in r["tasks"] if t["task"] == "write-item"]
        moved = sum(t["read"] + t["write"] for t in r["tasks"])
        est = estimates.get(r["workers"])
        out.append(
            f"| {r['runner']} | {r['workers']} | {len(items)} | "
            f"{sum(t['read'] for t in items) / MB:.0f} | {sum(t['write'] for t in items) / MB:.0f} | "
            f"{r['wall']:.1f} | {r['span']:.1f} | {moved / MB / r['span']:.0f} | "
            f"{'' if est is None else f'{est:.1f}'} |"
        )
    for r in runs:
        out += ["", f"## Per worker: {r['runner']}", ""]
        out += [
            "| worker | items | MB read | MB written | busy s | MB/s busy | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        by: dict[str, list[dict]] = {}
        for t in r["tasks"]:
            by.setdefault(t["worker"], []).append(t)
        for w, ts in sorted(by.items()):
            busy = sum(t["seconds"] for t in ts)
            moved = sum(t["read"] + t["write"] for t in ts)
            out.append(
                f"| {_fmt_worker(w)} | {sum(t['task'] == 'write-item' for t in ts)} | "
                f"{sum(t['read'] for t in ts) / MB:.0f} | {sum(t['write'] for t in ts) / MB:.0f} | "
                f"{busy:.1f} | {moved / MB / busy:.0f} | {max(t['rss'] for t in ts) / MB:.0f} |"
            )
    last = runs[-1]
    out += ["", f"## Per task: {last['runner']}", ""]
    out += [
        "| task | item / file | worker | start s | seconds | MB read | MB written |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for t in sorted(last["tasks"], key=lambda t: t["start"]):
        out.append(
            f"| {t['task']} | {t['what']} | {_fmt_worker(t['worker'])} | {t['start']:.1f} | "
            f"{t['seconds']:.1f} | {t['read'] / MB:.0f} | {t['write'] / MB:.0f} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="ViT-Large-width layers (4: 200 MB fp32)")
    p.add_argument("--source-tp", type=int, default=2)
    p.add_argument("--source-pp", type=int, default=1)
    p.add_argument("--target-tp", type=int, default=2)
    p.add_argument("--target-pp", type=int, default=2)
    p.add_argument("--workers", default="1,2", help="Dask LocalCluster sizes, e.g. 1,2,4")
    p.add_argument("--storage", choices=("s3", "local"), default="s3")
    args = p.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the workers inherit it
    logging.getLogger("distributed").setLevel(logging.WARNING)
    work = tempfile.mkdtemp(prefix="ckpt-scaleout-")
    try:
        with contextlib.ExitStack() as stack:
            if args.storage == "s3":
                stack.enter_context(moto_server())
            stack.enter_context(prefect_api())
            from ckptcore.api import describe_source, plan_conversion
            from ckptcore.sources import open_checkpoint
            from ckptcore.workplan import estimate, work_items

            local, src = make_source(work, args, args.storage)
            listing = describe_source(src)
            with open_checkpoint(local) as ck:
                planned = work_items(
                    ck, plan_conversion(ck, args.target_tp, args.target_pp), with_ranges=False
                )
            runs = []
            plans = [("threads:1", 1)] + [("dask", int(n)) for n in args.workers.split(",")]
            for runner, n in plans:
                staging = (
                    os.path.join(work, f"staging-{uuid.uuid4().hex[:6]}")
                    if args.storage == "local"
                    else f"s3://ckpt-scratch/bench-{uuid.uuid4().hex[:6]}"
                )
                runs.append(run_once(listing, args, runner, n, staging))
                print(f"{runs[-1]['runner']}: {runs[-1]['wall']:.1f} s", file=sys.stderr)
            one = [t for t in runs[0]["tasks"] if t["task"] == "write-item"]
            gbps = sum(t["read"] + t["write"] for t in one) / sum(t["seconds"] for t in one) / 1e9
            estimates = {n: estimate(planned, n, gbps)["seconds"] for _, n in plans}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(runs, estimates)
    print(text)
    print(
        f"\nestimate: ckptcore.workplan.estimate for {len(planned)} items at the one-worker run's "
        f"{gbps:.2f} GB/s per worker (items only; hashing not included)"
    )
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "scaleout.json"), "w") as f:
        json.dump({"args": vars(args), "gbps_per_worker": gbps, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
