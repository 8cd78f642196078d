"""Benchmark: the workers write the final ``.nemo`` in place (``convert`` with a ``runner``).

A TP=4 training checkpoint of ViT-Large width (24 layers: 1.2 GB of fp32 weights, ~3.6 GB with
the Adam state; the one ``bench/e2e_bench.py`` caches under ``bench/out/``) is converted to a
TP=2 ``.nemo`` four ways, each ``flows.convert.convert_vit`` in a fresh process against one
Prefect server (``prefect server start``, started here):

- ``s3-one``: source and destination in a local S3 server (moto, its own process, ranged GETs
  reading only the range: ``bench/moto_ranges.py --fast-ranges``), one process (the ``stream``
  route: write the ``.nemo`` locally while its upload follows it);
- ``s3-dask``: the same with a ``runner``: a Dask ``LocalCluster`` of ``--workers``
  single-threaded processes (started here, reached as ``dask://``) write the archive's pieces
  as parts of one multipart upload;
- ``folder-one`` / ``folder-dask``: the destination in a local folder (a shared filesystem
  stands in: every worker sees the same path), the source in S3 as before; the workers write
  their pieces at their offsets in one file beside the destination. (A source in a local folder
  is identified by the sha256 of its files, which ``list-source`` takes in the flow's process:
  it would read the whole training folder there, optimizer state included.)

Counted, not estimated, for the flow's process alone:

- its S3 traffic: the flow reaches S3 through a byte-counting proxy (``bench/s3_counter.py``,
  its own process: GET response bodies read, PUT/POST request bodies written), the Dask workers
  (their ``LocalCluster`` is started here, not by the flow) reach moto directly;
- its file I/O: ``/proc/self/io`` ``rchar`` + ``wchar`` (bytes through ``read``/``write``
  system calls: work files, a local destination; modules are imported before counting; verify
  runs in the flow's process, ``verify_process="inline"``, since Linux adds a reaped child's
  I/O to its parent's);
- the archive bytes it produced: the ``write-tail`` row of the ``work-items`` artifact (the
  tail plus the small members it handed to a piece).

Not counted: the Prefect API's traffic (task-run states and logs). Per worker: the archive
bytes of its ``write-piece`` rows. The archives of the one-process and the Dask runs are compared byte for
byte apart from ``lineage.json`` (the last member: everything before its header must match).

Usage::

    python bench/assemble_bench.py                 # 24 layers, 2 workers
    python bench/assemble_bench.py --layers 2 --only folder-one,folder-dask   # quick

Prints a markdown table and writes ``bench/out/assemble.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from e2e_bench import free_port, moto_process, wait_port  # noqa: E402
from s3_counter import read_counters, reset_counters, start_proxy_process  # noqa: E402

MB = 1e6
VARIANTS = ("s3-one", "s3-dask", "folder-one", "folder-dask")


def proc_io() -> dict[str, int]:
    with open("/proc/self/io", encoding="ascii") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


# -- the child: one conversion --------------------------------------------------------------------


def child(spec: dict) -> dict:
    import asyncio

    import distributed  # noqa: F401 - imported before counting: module files are not data
    import prefect_dask  # noqa: F401
    import torch  # noqa: F401
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    import ckptcore.model.vit  # noqa: F401
    from ckptcore.lineage import LineageRecord
    from flows.convert import convert_vit
    from tasks.publish import read_lineage

    before = proc_io()
    t0 = time.perf_counter()
    convert_vit(
        source=spec["source"],
        destination=spec["destination"],
        target_tp=spec["target_tp"],
        runner=spec.get("runner"),
        overwrite=True,
        verify_process="inline",  # a child process's I/O would count as this one's once reaped
    )
    wall = time.perf_counter() - t0
    after = proc_io()
    record: LineageRecord = read_lineage(spec["destination"])
    rows: list[dict] = []
    note = next((n for n in record.notes if n.startswith("assembled in place")), None)
    if note is not None:
        run_id = note.rsplit(", ", 1)[-1].split(")", 1)[0]

        async def table() -> list[dict]:
            async with get_client() as client:
                arts = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
                    )
                )
            data = next(a.data for a in arts if a.key == "work-items")
            return json.loads(data) if isinstance(data, str) else data

        rows = asyncio.run(table())
    return {
        "wall": wall,
        "io": {k: after[k] - before[k] for k in after},
        "output_bytes": record.output.size_bytes,
        "verify": record.verify.method if record.verify else None,
        "rows": rows,
        "timings": record.timings,
    }


# -- the parent ------------------------------------------------------------------------------------


@contextlib.contextmanager
def prefect_server(home: str):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = open(os.path.join(home, "server.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_port(port, "prefect server", timeout=180)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        log.close()


@contextlib.contextmanager
def local_cluster(workers: int):
    """A Dask ``LocalCluster`` of single-threaded worker processes, owned by this process (the
    flow reaches it as ``dask://``): the workers are not the flow process's children, so
    ``/proc/<flow>/io`` counts the flow alone (Linux adds a reaped child's I/O to its parent's)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        scheduler_port=free_port(),
    ) as cluster:  # fmt: skip
        yield "dask://" + cluster.scheduler_address.removeprefix("tcp://")


def members_before_lineage(read, size: int) -> int:
    """Where ``lineage.json``'s header starts (the archive's last member)."""
    import io

    class Reader(io.RawIOBase):
        pos = 0

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, offset, whence=0):
            self.pos = (
                offset if whence == 0 else (self.pos + offset if whence == 1 else size + offset)
            )
            return self.pos

        def tell(self):
            return self.pos

        def readinto(self, buf):
            data = read(self.pos, min(len(buf), size - self.pos))
            buf[: len(data)] = data
            self.pos += len(data)
            return len(data)

    with tarfile.open(fileobj=io.BufferedReader(Reader(), 1 << 16), mode="r:") as tar:
        last = tar.getmembers()[-1]
    assert last.name == "./lineage.json", last.name
    return last.offset


def same_apart_from_lineage(fs, a: str, b: str) -> bool:
    """The archives agree byte for byte up to their ``lineage.json`` member."""
    sizes = [fs.size(p) for p in (a, b)]
    ends = [
        members_before_lineage(lambda o, n, p=p: fs.cat_file(p, start=o, end=o + n), s)
        for p, s in zip((a, b), sizes, strict=True)
    ]
    if ends[0] != ends[1]:
        return False
    step = 64 << 20
    for at in range(0, ends[0], step):
        n = min(step, ends[0] - at)
        if fs.cat_file(a, start=at, end=at + n) != fs.cat_file(b, start=at, end=at + n):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.path.join(HERE, "out", "assemble.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with open(args.child) as f:
            spec = json.load(f)
        result = child(spec)
        with open(spec["result"], "w") as f:
            json.dump(result, f)
        return 0

    import fsspec

    from ckptcore.sample import vit_config, write_training_checkpoint

    source = os.path.join(HERE, "out", f"e2e-src-L{args.layers}-tp4", "checkpoints")
    if not os.path.isdir(source):
        write_training_checkpoint(source, vit_config("large", layers=args.layers), tp=4, step=100)
    work = tempfile.mkdtemp(prefix="assemble-bench-")
    only = [v for v in args.only.split(",") if v]
    results: dict[str, dict] = {}
    try:
        with (
            moto_process(os.path.join(work, "moto.log"), fast_ranges=True) as moto,
            start_proxy_process(moto) as proxy,
            prefect_server(work) as api,
        ):
            env = dict(
                os.environ, AWS_ENDPOINT_URL_S3=moto, AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                PREFECT_API_URL=api, CKPT_RUNNER_WORKERS=str(args.workers),
                CKPT_WORK_DIR=os.path.join(work, "ckpt-work"),
            )  # fmt: skip
            os.environ.update(env)
            s3 = fsspec.filesystem("s3", skip_instance_cache=True)
            prefix = f"bench-{uuid.uuid4().hex[:6]}"
            if only:
                for bucket in ("ckpt-training", "ckpt-models"):
                    s3.mkdir(bucket)
                s3.put(source + "/", f"ckpt-training/{prefix}/checkpoints/", recursive=True)
            out_dir = os.path.join(work, "models")
            for variant in only:
                place, how = variant.split("-")
                spec = {
                    "source": f"s3://ckpt-training/{prefix}/checkpoints",
                    "destination": (
                        f"s3://ckpt-models/{prefix}/{how}.nemo" if place == "s3"
                        else os.path.join(out_dir, f"{how}.nemo")
                    ),
                    "target_tp": 2,
                    "runner": "dask" if how == "dask" else None,
                    "result": os.path.join(work, f"{variant}.json"),
                }  # fmt: skip
                spec_path = os.path.join(work, f"{variant}.spec.json")
                with open(spec_path, "w") as f:
                    json.dump(spec, f)
                log = open(os.path.join(work, f"{variant}.log"), "wb")
                print(f"{variant} ...", file=sys.stderr, flush=True)
                with (
                    local_cluster(args.workers)
                    if how == "dask"
                    else contextlib.nullcontext() as address
                ):
                    if address:  # the cluster is this process's: its workers' I/O is not the flow's
                        with open(spec_path, "w") as f:
                            json.dump({**spec, "runner": address}, f)
                    reset_counters(proxy)
                    subprocess.run(
                        [sys.executable, __file__, "--child", spec_path],
                        env={**env, "AWS_ENDPOINT_URL_S3": proxy},  # the flow's S3, counted
                        stdout=log, stderr=subprocess.STDOUT, check=True,
                    )  # fmt: skip
                    counted = read_counters(proxy)
                with open(spec["result"]) as f:
                    results[variant] = {
                        **json.load(f), "destination": spec["destination"],
                        "s3": {k: counted[k] for k in ("read_bytes", "written_bytes", "requests")},
                    }  # fmt: skip
            for place, fs in (("s3", s3), ("folder", fsspec.filesystem("file"))):
                one, dask = results.get(f"{place}-one"), results.get(f"{place}-dask")
                if one and dask:
                    dask["same_as_one"] = same_apart_from_lineage(
                        fs, one["destination"].removeprefix("s3://"),
                        dask["destination"].removeprefix("s3://"),
                    )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    date = time.strftime("%Y-%m-%d")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"date": date, "layers": args.layers, "workers": args.workers, "runs": results},
            f,
            indent=1,
        )
    print(report(results, date, args))
    return 0


def report(results: dict[str, dict], date: str, args) -> str:
    lines = [
        f"{date}, `python bench/assemble_bench.py --layers {args.layers} --workers {args.workers}`",
        "",
        "| run | wall s | output MB | archive bytes from the flow | flow's S3 read + written MB | flow's file I/O MB | through the flow, % of output | per worker MB | same as one-process |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in results.items():
        out = r["output_bytes"]
        rows = r.get("rows") or []
        tail = sum(x["write_bytes"] for x in rows if x["task"] == "write-tail")
        per: dict[str, int] = {}
        for x in rows:
            if x["task"] == "write-piece":
                per[x["worker"]] = per.get(x["worker"], 0) + x["write_bytes"]
        flow = f"{tail:,} ({tail / out:.3%})" if rows else f"{out:,} (100%)"
        workers = ", ".join(f"{v / MB:.0f}" for v in per.values()) or "-"
        files = r["io"]["rchar"] + r["io"]["wchar"]
        net = r["s3"]["read_bytes"] + r["s3"]["written_bytes"]
        same = {True: "yes", False: "NO"}.get(r.get("same_as_one"), "-")
        lines.append(
            f"| {name} | {r['wall']:.1f} | {out / MB:.0f} | {flow} | {net / MB:.1f} | "
            f"{files / MB:.1f} | {(net + files) / out:.2%} | {workers} | {same} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
