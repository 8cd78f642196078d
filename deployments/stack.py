"""Helpers for serve.sh: wait for endpoints, create buckets and work pools, wait for workers.

    python deployments/stack.py wait-http URL [TIMEOUT]
    python deployments/stack.py buckets NAME...            # in $AWS_ENDPOINT_URL_S3
    python deployments/stack.py pools                      # cpu-pool, gpu-pool (concurrency 1)
    python deployments/stack.py wait-workers POOL... [--timeout S]

One Python process for several API calls instead of one CLI start (seconds each) per call.
Everything is read from the environment (PREFECT_API_URL, AWS_*), nothing is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.error
import urllib.request

POOLS = {"cpu-pool": None, "gpu-pool": 1}  # name -> concurrency limit


def wait_http(url: str, timeout: float) -> None:
    """Poll ``url`` until it answers (any HTTP status below 500)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
            last = str(exc)
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    sys.exit(f"{url} did not answer within {timeout:.0f}s ({last})")


def make_buckets(names: list[str]) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    for name in names:
        if not fs.exists(name):
            fs.mkdir(name)
        print(f"bucket s3://{name}")


async def make_pools() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        for name, limit in POOLS.items():
            try:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type="process",
                        base_job_template=template,
                        concurrency_limit=limit,
                    )
                )
            except ObjectAlreadyExists:
                await client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
            print(f"work pool {name} (process, concurrency {limit or 'unlimited'})")


async def wait_workers(pools: list[str], timeout: float) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    waiting = list(pools)
    async with get_client() as client:
        while waiting and time.monotonic() < deadline:
            for pool in list(waiting):
                workers = await client.read_workers_for_work_pool(pool)
                if any(str(w.status).upper().endswith("ONLINE") for w in workers):
                    waiting.remove(pool)
                    print(f"worker online in {pool}")
            if waiting:
                await asyncio.sleep(1)
    if waiting:
        sys.exit(f"no worker came online in {', '.join(waiting)} within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("wait-http")
    p.add_argument("url")
    p.add_argument("timeout", nargs="?", type=float, default=120.0)
    p = sub.add_parser("buckets")
    p.add_argument("names", nargs="+")
    sub.add_parser("pools")
    p = sub.add_parser("wait-workers")
    p.add_argument("pools", nargs="+")
    p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.cmd == "wait-http":
        wait_http(args.url, args.timeout)
    elif args.cmd == "buckets":
        make_buckets(args.names)
    elif args.cmd == "pools":
        asyncio.run(make_pools())
    else:
        asyncio.run(wait_workers(args.pools, args.timeout))


if __name__ == "__main__":
    main()
