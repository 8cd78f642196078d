"""Benchmark: end to end with a local S3 server, TP=4 training checkpoint -> TP=2 ``.nemo`` in S3.

Makes a ViT-Large-width training checkpoint with Adam state (``ckptcore.sample``;
24 layers = 1.2 GB of fp32 weights, ~3.6 GB with the optimizer state; cached under
``bench/out/``), puts it in moto's S3 server (its own process) behind a byte-counting proxy
(``bench/s3_counter.py``, its own process: bytes read from S3 are what GET responses carried
through it, not what clients report), then runs each variant as a fresh process with its
memory sampled every 5 ms (``bench/memwatch.py``, anonymous and file-backed RSS summed over
the process tree), the proxy's counters reset before each:

- ``floor``: s3fs copies only the model weights' byte ranges of every rank file (adjacent
  records coalesced, one streaming ranged GET per coalesced range) into one new S3 object
  (s3fs multipart upload, 64 MiB parts): read once, write once, sequential;
  ``floor-overlap``: the same with a reader thread up to 64 MiB ahead of the writer;
- ``flow`` / ``flow-noverify``: ``flows.convert.convert_vit(source=s3://..., destination=s3://...nemo,
  target_tp=2, overwrite=True[, verify=False])`` against a Prefect server (the local stack,
  ``deployments/serve.sh``, started once for the benchmark); the upload streams while the
  ``.nemo`` is written (``upload="stream"``, the default) and is completed after verify;
  ``flow-after``: the same with ``upload="after"`` (package, verify, then upload);
  ``flow-verify-inline``: the same with ``verify_process="inline"`` (verify imports torch and
  runs in the flow's process, not in the verify process started with the run); the
  phases are the lineage record's timings (streamed: ``upload`` overlaps ``write`` and
  ``verify``, ``commit`` is what is left of it after verify); the floor's are ``copy`` and
  ``complete`` (closing the file: the last part and the multipart completion); phases are
  medians over the repetitions;
- ``flow-threads``: the same in the mapped mode (``runner="threads"``, staging in the local
  work folder);
- ``ckpt-s3``: ``ckpt convert s3://... s3://....nemo --target-tp 2`` (ckptcore alone, no Prefect,
  no verify, no lineage);
- ``download-convert-upload``: s3fs ``get`` of the whole checkpoint folder, ``ckpt convert``
  locally, s3fs ``put`` of the ``.nemo``;
- ``naive``: download everything, ``torch.load`` every rank file whole (optimizer state
  included), ``torch.cat`` / split, ``torch.save``, tar, upload (NeMo's tools' way;
  ``bench/naive_reshard.py`` for training checkpoints).

``--overhead``: Prefect's fixed cost per run on a tiny training checkpoint (~130 KB per rank
file) in S3: ``convert/vit`` run through its deployment with a warm worker (submission with
``run_deployment(timeout=0)``, completion seen by polling the API every 0.1 s; one warm-up
run, then N), once with the parameter ``repartition="inline"`` and once as deployed
(repartition handed to ``repartition/vit`` in gpu-pool); and for comparison the same
conversion called in one process: ``convert_vit(...)`` (a flow run, no worker) and
``ckptcore.api.convert`` (no Prefect). Worker settings: ``--query-seconds``
(``PREFECT_WORKER_QUERY_SECONDS``, the stack's default is 5).

Also measured once: the proxy's own cost (a 256 MiB GET and PUT direct vs through it) and
moto's ranged-GET latency. Stock moto reads the whole object for every ranged GET, so many
small ranges of big objects measure moto; ``--fast-ranges`` runs moto with ranged GETs that
read only the range (``bench/moto_ranges.py``), closer to real S3.

Usage::

    python bench/e2e_bench.py --layers 2 --overhead          # quick
    python bench/e2e_bench.py --size-gb 1.2 --fast-ranges --repeat 3 --overhead
    python bench/e2e_bench.py --size-gb 1.2 --only floor,flow   # stock moto: ~18 min for the flow
    python bench/e2e_bench.py --only floor,flow,flow-noverify --fast-ranges
    python bench/e2e_bench.py --replot bench/out/e2e.json      # tables and chart again

Prints markdown tables, writes ``bench/out/e2e.json`` and the chart ``docs/img/e2e.svg``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

MB = 1e6
GB = 1e9
MiB = 1 << 20
LAYER_BYTES = 1024 * 1024 * 4 * 12  # ~one ViT-L layer in fp32 (12 H^2 params)
BUCKETS = ("ckpt-training", "ckpt-models", "ckpt-scratch")
SOURCE_PREFIX = "ckpt-training/bench-e2e"
OUT_PREFIX = "ckpt-models/bench-e2e"

VARIANTS = {
    "floor": "floor: weights' byte ranges S3 → S3 (s3fs)",
    "floor-overlap": "floor, reads overlapped with writes",
    "flow": "convert flow (verify)",
    "flow-noverify": "convert flow (verify=False)",
    "flow-verify-inline": "convert flow, verify_process=inline",
    "flow-after": "convert flow, upload after verify (upload=after)",
    "flow-threads": "convert flow, mapped (runner=threads)",
    "ckpt-s3": "ckpt convert s3:// → s3:// (no Prefect)",
    "download-convert-upload": "download → ckpt convert → upload",
    "naive": "naive: download → load all → cat → save → upload",
}
FLOW_VARIANTS = ("flow", "flow-noverify", "flow-verify-inline", "flow-after", "flow-threads")
FLOW_PARAMS = {
    "flow-after": {"upload": "after"},
    "flow-verify-inline": {"verify_process": "inline"},
    "flow-threads": {"runner": "threads"},
}


# -- infrastructure -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start on port {port}")


@contextlib.contextmanager
def moto_process(log: str, fast_ranges: bool):
    """moto's S3 server in its own process on a free port (``bench/moto_ranges.py``: stock
    moto, or with ranged GETs that read only the range); yields its URL."""
    port = free_port()
    cmd = [sys.executable, os.path.join(HERE, "moto_ranges.py"), "-H", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd + (["--fast-ranges"] if fast_ranges else []),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port(port, "moto")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def local_stack(work: str, s3_url: str, query_seconds: float):
    """The local stack (``deployments/serve.sh``: Prefect server, pools cpu-pool/gpu-pool,
    ``prefect deploy --all``, one process worker per pool) on free ports, talking to ``s3_url``;
    yields the environment its clients need. ``deployments/stop.sh`` stops exactly it."""
    stack = os.path.join(work, "stack")
    os.makedirs(stack, exist_ok=True)
    env = dict(os.environ)
    for k in [k for k in env if k.startswith(("PREFECT_", "CKPT_"))]:
        del env[k]
    env.update(
        CKPT_STACK_DIR=stack,
        CKPT_PREFECT_PORT=str(free_port()),
        AWS_ENDPOINT_URL_S3=s3_url,  # the counting proxy: serve.sh starts no moto
        PREFECT_WORKER_QUERY_SECONDS=f"{query_seconds:g}",
        CKPT_SCRATCH_URL="s3://ckpt-scratch/bench-e2e-stack",
        CKPT_WORK_DIR=os.path.join(work, "stack-work"),
        PY=sys.executable,
    )
    t0 = time.perf_counter()
    log = os.path.join(work, "serve.log")
    try:
        with open(log, "wb") as f:
            subprocess.run(
                [os.path.join(ROOT, "deployments", "serve.sh")],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                check=True,
                cwd=ROOT,
            )
        client = {}
        with open(os.path.join(stack, "env")) as f:
            for line in f:
                if line.startswith("export "):
                    k, v = line[len("export ") :].strip().split("=", 1)
                    client[k] = v
        client["PREFECT_HOME"] = os.path.join(stack, "prefect")
        print(f"# stack up in {time.perf_counter() - t0:.0f} s ({log})", file=sys.stderr)
        yield client
    except subprocess.CalledProcessError:
        with open(log, errors="replace") as f:
            sys.stderr.write(f.read()[-4000:])
        raise
    finally:
        subprocess.run(
            [os.path.join(ROOT, "deployments", "stop.sh")],
            env=env,
            stdout=subprocess.DEVNULL,
            check=False,
            cwd=ROOT,
        )


def s3fs_at(endpoint: str):
    """An s3fs filesystem on ``endpoint`` (moto directly: setup and cleanup are not counted)."""
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=endpoint, skip_instance_cache=True, config_kwargs={"read_timeout": 900}
    )


# -- the source ---------------------------------------------------------------------------------


def make_source(out: str, layers: int, tp: int) -> tuple[str, str]:
    """A cached ViT-Large-width training checkpoint (Adam state included); (folder, name)."""
    from ckptcore.sample import vit_config, write_training_checkpoint

    folder = os.path.join(out, f"e2e-src-L{layers}-tp{tp}", "checkpoints")
    marker = os.path.join(os.path.dirname(folder), "complete.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return folder, json.load(f)["name"]
    shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
    t0 = time.perf_counter()
    name, _ = write_training_checkpoint(folder, vit_config("large", layers=layers), tp=tp, step=100)
    with open(marker, "w") as f:
        json.dump({"name": name, "layers": layers, "tp": tp}, f)
    print(f"# source written in {time.perf_counter() - t0:.0f} s: {folder}", file=sys.stderr)
    return folder, name


def weight_ranges(folder: str, target_tp: int) -> dict:
    """Per rank file: the byte ranges of the model weights' zip records (from ckptcore's reader
    of the local copy, so S3 sees none of this), and what the plan's work items read."""
    from ckptcore.api import plan_conversion
    from ckptcore.sources import open_checkpoint
    from ckptcore.workplan import work_items

    files: dict[str, list[tuple[int, int]]] = {}
    with open_checkpoint(folder) as ck:
        sizes = {os.path.relpath(u, folder): s for u, s in ck.files}
        for _, sr in sorted(ck.ranks.items()):
            for key in sr.state:
                span = sr.span(key)
                if span is None:
                    continue
                src = span.src
                base = getattr(src, "base", 0)
                name = getattr(getattr(src, "parent", None), "name", None) or src.name
                files.setdefault(os.path.relpath(name, folder), []).append(
                    (base + span.offset, span.length)
                )
        items = work_items(ck, plan_conversion(ck, target_tp, 1), with_ranges=False)
    for ranges in files.values():
        ranges.sort()
    return {
        "files": files,
        "sizes": sizes,
        "weights_bytes": sum(n for r in files.values() for _, n in r),
        "checkpoint_bytes": sum(sizes.values()),
        "plan_read_bytes": sum(i.read_bytes for i in items),
        "output_weight_bytes": sum(i.write_bytes for i in items),
    }


def upload_folder(fs, local: str, prefix: str) -> None:
    """Put a local folder's files one at a time, each retried: moto completes a large multipart
    upload slowly, and a retried CompleteMultipartUpload racing the first can fail (a moto bug)."""
    for folder, _, names in os.walk(local):
        for name in sorted(names):
            path = os.path.join(folder, name)
            key = f"{prefix.rstrip('/')}/{os.path.relpath(path, local)}"
            for attempt in range(4):
                try:
                    fs.put_file(path, key)
                    if fs.info(key)["size"] == os.path.getsize(path):
                        break
                except Exception as exc:
                    if attempt == 3:
                        raise
                    print(f"# upload of {key} failed ({exc}); again", file=sys.stderr)
                    time.sleep(5)


# -- proxy and moto probes ----------------------------------------------------------------------


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def probe_proxy(moto_url: str, proxy_url: str) -> dict:
    """A 256 MiB object's GET and PUT, directly to moto and through the proxy (best of 3)."""
    direct, proxied = s3fs_at(moto_url), s3fs_at(proxy_url)
    data = os.urandom(256 * MiB)
    key = f"ckpt-scratch/bench-e2e-probe/{uuid.uuid4().hex[:6]}"
    direct.pipe(key, data)
    out: dict = {"bytes": len(data)}
    try:
        out["get_direct_s"] = best_of(3, lambda: direct.cat_file(key))
        out["get_proxy_s"] = best_of(3, lambda: proxied.cat_file(key))
        out["put_direct_s"] = best_of(3, lambda: direct.pipe(key + ".w", data))
        out["put_proxy_s"] = best_of(3, lambda: proxied.pipe(key + ".w", data))
    finally:
        direct.rm(key.rsplit("/", 1)[0], recursive=True)
    return out


def probe_moto_ranges(moto_url: str, big: str, big_size: int) -> dict:
    """moto's time for a ranged GET: 1 MiB of a small object vs 1 MiB / 64 MiB of a big one."""
    fs = s3fs_at(moto_url)
    small = f"ckpt-scratch/bench-e2e-probe/small-{uuid.uuid4().hex[:6]}"
    fs.pipe(small, os.urandom(8 * MiB))
    mid = big_size // 2
    try:
        return {
            "big_object_bytes": big_size,
            "small_object_bytes": 8 * MiB,
            "small_1MiB_s": best_of(3, lambda: fs.cat_file(small, start=MiB, end=2 * MiB)),
            "big_1MiB_s": best_of(3, lambda: fs.cat_file(big, start=mid, end=mid + MiB)),
            "big_64MiB_s": best_of(
                3, lambda: fs.cat_file(big, start=0, end=min(big_size, 64 * MiB))
            ),
        }
    finally:
        fs.rm(small)


# -- children (each variant runs as `e2e_bench.py --child KIND`, wrapped by memwatch) ------------


def _coalesce(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int, list]]:
    """Ranges closer than ``gap`` merged: (start, end, [(offset, length) records inside])."""
    out: list[tuple[int, int, list]] = []
    for off, n in sorted(ranges):
        if out and off - out[-1][1] <= gap:
            start, end, recs = out[-1]
            out[-1] = (start, max(end, off + n), recs + [(off, n)])
        else:
            out.append((off, off + n, [(off, n)]))
    return out


def _weight_pieces(fs, spec: dict, stats: dict):
    """The weights' record bytes, in order, as slices of 8 MiB body reads: one streaming ranged
    GET per coalesced range."""
    from fsspec.asyn import sync

    for f in spec["files"]:
        bucket, key, _ = fs.split_path(f["url"])
        for start, end, recs in _coalesce([tuple(r) for r in f["ranges"]], spec["gap"]):
            resp = fs.call_s3(
                "get_object",
                Bucket=bucket,
                Key=key,
                Range=f"bytes={start}-{end - 1}",
            )
            stats["gets"] += 1
            body = resp["Body"]
            pos, i = start, 0
            while pos < end:
                chunk = sync(fs.loop, body.read, 8 * MiB)
                if not chunk:
                    raise RuntimeError(f"{f['url']}: short body at {pos} of {start}-{end}")
                view, cend = memoryview(chunk), pos + len(chunk)
                while i < len(recs) and recs[i][0] < cend:
                    off, n = recs[i]
                    lo, hi = max(off, pos), min(off + n, cend)
                    if hi > lo:
                        yield view[lo - pos : hi - pos]
                    if off + n <= cend:
                        i += 1
                    else:
                        break
                pos = cend
            body.close()


def child_floor(spec: dict) -> dict:
    """Copy the weights' records of every rank file into one S3 object (s3fs multipart, 64 MiB
    parts, only the records' bytes written). Sequential: read a piece, write it; with
    ``overlap``, a reader thread keeps up to 8 pieces (64 MiB) ahead of the writer."""
    import queue
    import threading

    import fsspec

    fs = fsspec.filesystem("s3")
    t0 = time.perf_counter()
    stats = {"gets": 0, "written": 0}
    out = fs.open(spec["dest"], "wb", block_size=spec["block"])
    with out:
        if not spec.get("overlap"):
            for piece in _weight_pieces(fs, spec, stats):
                out.write(piece)
                stats["written"] += len(piece)
        else:
            q: queue.Queue = queue.Queue(maxsize=8)
            done = object()

            def reader() -> None:
                try:
                    for piece in _weight_pieces(fs, spec, stats):
                        q.put(piece)
                    q.put(done)
                except BaseException as exc:
                    q.put(exc)

            threading.Thread(target=reader, daemon=True).start()
            while (item := q.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                out.write(item)
                stats["written"] += len(item)
        copied = time.perf_counter()
    # close() sends the last part and completes the multipart upload
    phases = {"copy": copied - t0, "complete": time.perf_counter() - copied}
    return {"work_s": time.perf_counter() - t0, "phases": phases, **stats}


def child_flow(spec: dict) -> dict:
    from flows.convert import convert_vit

    t0 = time.perf_counter()
    summary = convert_vit(**spec["params"])
    work_s = time.perf_counter() - t0
    import fsspec

    sidecar = spec["params"]["destination"] + ".lineage.json"
    with fsspec.open(sidecar, "rb") as f:
        timings = json.load(f)["timings"]
    return {"work_s": work_s, "summary": summary, "phases": timings}


def _download(fs, src: str, local: str) -> float:
    t0 = time.perf_counter()
    fs.get(src.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
    return time.perf_counter() - t0


def _upload(fs, path: str, dest: str) -> float:
    t0 = time.perf_counter()
    fs.put_file(path, dest)
    return time.perf_counter() - t0


def child_ckpt_s3(spec: dict) -> dict:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ckptcore.cli", "convert", spec["source"], spec["dest"],
         "--target-tp", str(spec["target_tp"]), "--overwrite", "--progress", "never"],
        check=True, stdout=sys.stderr,
    )  # fmt: skip
    return {"work_s": time.perf_counter() - t0}


def child_dcu(spec: dict) -> dict:
    import fsspec

    fs = fsspec.filesystem("s3")
    t0 = time.perf_counter()
    local, out = os.path.join(spec["work"], "checkpoints"), os.path.join(spec["work"], "out.nemo")
    phases = {"download": _download(fs, spec["source"], local)}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ckptcore.cli", "convert", local, out,
         "--target-tp", str(spec["target_tp"]), "--overwrite", "--progress", "never"],
        check=True, stdout=sys.stderr,
    )  # fmt: skip
    phases["convert"] = time.perf_counter() - t
    phases["upload"] = _upload(fs, out, spec["dest"])
    return {"work_s": time.perf_counter() - t0, "phases": phases}


def child_naive(spec: dict) -> dict:
    """NeMo's way for a training checkpoint: everything in memory at once."""
    import glob
    import tarfile

    import fsspec
    import torch
    import yaml
    from naive_reshard import COLUMN, ROW
    from omegaconf import OmegaConf

    from ckptcore.formats.safe_pickle import TORCH_SAFE_GLOBALS

    fs = fsspec.filesystem("s3")
    t0 = time.perf_counter()
    local = os.path.join(spec["work"], "checkpoints")
    phases = {"download": _download(fs, spec["source"], local)}
    t = time.perf_counter()
    paths = sorted(glob.glob(os.path.join(local, "mp_rank_*", "*-last.ckpt")))
    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    cfg = OmegaConf.to_container(shards[0]["hyper_parameters"]["cfg"], resolve=True)
    keys = list(shards[0]["state_dict"])
    merged = {}
    for key in keys:
        vals = [s["state_dict"][key] for s in shards]
        if vals[0] is None or not isinstance(vals[0], torch.Tensor):
            merged[key] = vals[0]
        elif COLUMN.search(key):
            merged[key] = torch.cat(vals, 0)
        elif ROW.search(key):
            merged[key] = torch.cat(vals, 1)
        else:
            merged[key] = vals[0]
    tp = spec["target_tp"]
    out_dir = os.path.join(spec["work"], "out")
    os.makedirs(out_dir)
    cfg["tensor_model_parallel_size"], cfg["pipeline_model_parallel_size"] = tp, 1
    with open(os.path.join(out_dir, "model_config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    for r in range(tp):
        sd = {}
        for key, v in merged.items():
            if not isinstance(v, torch.Tensor):
                sd[key] = v
            elif COLUMN.search(key):
                sd[key] = v.chunk(tp, 0)[r].clone()
            elif ROW.search(key):
                sd[key] = v.chunk(tp, 1)[r].clone()
            else:
                sd[key] = v.clone()
        os.makedirs(os.path.join(out_dir, f"mp_rank_{r:02d}"))
        torch.save(sd, os.path.join(out_dir, f"mp_rank_{r:02d}", "model_weights.ckpt"))
    nemo = os.path.join(spec["work"], "out.nemo")
    with tarfile.open(nemo, "w:") as tar:
        tar.add(out_dir, arcname=".")
    phases["convert"] = time.perf_counter() - t
    phases["upload"] = _upload(fs, nemo, spec["dest"])
    return {"work_s": time.perf_counter() - t0, "phases": phases}


def _first_states(client, flow_run_id) -> dict[str, float]:
    """{state type: when the run first entered it}."""
    states: dict[str, float] = {}
    for s in client.read_flow_run_states(flow_run_id):
        states.setdefault(s.type.value, s.timestamp.timestamp())
    return states


def _subflow_spans(client, flow_run_id, parent: dict[str, float]) -> dict:
    """Where a run that handed work to a deployment spent its body: before the child run was
    created, the child's wait for a worker, its process start and body, and the parent's work
    after the child completed (empty when the run had no child run)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
        )
    )
    if not children:
        return {}
    child = children[0]
    st = _first_states(client, child.id)
    created = child.created.timestamp() if child.created else st.get("SCHEDULED", 0)
    done = st.get("COMPLETED", created)
    return {
        "child_s": {
            "before": created - parent.get("RUNNING", created),
            "pickup": st.get("PENDING", created) - created,
            "start": st.get("RUNNING", done) - st.get("PENDING", done),
            "body": done - st.get("RUNNING", done),
            "after": parent.get("COMPLETED", done) - done,
        }
    }


def child_overhead(spec: dict) -> dict:
    """Deployment runs: submit with run_deployment(timeout=0), poll every 0.1 s until final."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_WORKER_PREFETCH_SECONDS, PREFECT_WORKER_QUERY_SECONDS

    runs = []
    with get_client(sync_client=True) as client:
        for i in range(spec["warmup"] + spec["n"]):
            params = dict(spec["params"], destination=f"{spec['dest_prefix']}/run-{i}.nemo")
            t0 = time.time()
            fr = run_deployment(
                spec["deployment"],
                parameters=params,
                timeout=0,
                job_variables=spec.get("job_variables"),
            )
            submitted = time.time()
            while True:
                run = client.read_flow_run(fr.id)
                if run.state is not None and run.state.is_final():
                    break
                time.sleep(0.1)
            done = time.time()
            states = _first_states(client, fr.id)
            runs.append(
                {
                    **_subflow_spans(client, fr.id, states),
                    "warmup": i < spec["warmup"],
                    "state": run.state.type.value,
                    "total_s": done - t0,
                    "submit_s": submitted - t0,
                    "pickup_s": states.get("PENDING", done) - t0,
                    "start_s": states.get("RUNNING", done) - states.get("PENDING", done),
                    "body_s": states.get(run.state.type.value, done) - states.get("RUNNING", done),
                    "seen_s": done - states.get(run.state.type.value, done),
                }
            )
    return {
        "runs": runs,
        "settings": {
            "PREFECT_WORKER_QUERY_SECONDS": PREFECT_WORKER_QUERY_SECONDS.value(),
            "PREFECT_WORKER_PREFETCH_SECONDS": PREFECT_WORKER_PREFETCH_SECONDS.value(),
        },
    }


def child_calls(spec: dict) -> dict:
    """The tiny conversion called in this process: the flow (a flow run, no worker) and
    ``ckptcore.api.convert`` (no Prefect), each ``1 + n`` times (the first is reported apart)."""
    from ckptcore.api import convert
    from flows.convert import convert_vit

    out: dict = {"flow": [], "api": []}
    for i in range(1 + spec["n"]):
        t0 = time.perf_counter()
        convert_vit(**dict(spec["params"], destination=f"{spec['dest_prefix']}/flow-{i}.nemo"))
        out["flow"].append(time.perf_counter() - t0)
    for i in range(1 + spec["n"]):
        t0 = time.perf_counter()
        convert(
            spec["params"]["source"],
            f"{spec['dest_prefix']}/api-{i}.nemo",
            target_tp=spec["params"]["target_tp"],
            target_pp=spec["params"]["target_pp"],
            overwrite=True,
        )
        out["api"].append(time.perf_counter() - t0)
    return out


CHILDREN = {
    "floor": child_floor,
    "flow": child_flow,
    "ckpt-s3": child_ckpt_s3,
    "download-convert-upload": child_dcu,
    "naive": child_naive,
    "overhead": child_overhead,
    "calls": child_calls,
}


def child_main(kind: str, spec_path: str, result_path: str, log: str) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    sys.stdout = sys.stderr
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = {"ok": True, **CHILDREN[kind](spec)}
        rc = 0
    except BaseException as exc:  # reported as a failed row, not a crashed benchmark
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        rc = 1
    with open(result_path, "w") as f:
        json.dump(result, f, default=str)
    return rc


# -- the parent ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, work: str, moto_url: str, proxy_url: str) -> None:
        self.args, self.work = args, work
        self.moto_url, self.proxy_url = moto_url, proxy_url
        self.fs = s3fs_at(moto_url)
        self.logs = os.path.join(args.out_dir, "e2e-logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(
            AWS_ENDPOINT_URL_S3=proxy_url,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        for k in ("CKPT_STAGING_URL", "CKPT_SCRATCH_URL"):
            self.env.pop(k, None)

    def child(self, kind: str, spec: dict, name: str, env: dict | None = None) -> dict:
        """Run one child process under memwatch; its result JSON plus wall time and peaks."""
        from memwatch import run as memrun

        tag = f"{name}-{uuid.uuid4().hex[:6]}"
        spec_path = os.path.join(self.work, f"{tag}.spec.json")
        result_path = os.path.join(self.work, f"{tag}.result.json")
        log = os.path.join(self.logs, f"{name}.log")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        with open(log, "w") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {kind}: {json.dumps(spec)[:2000]}\n")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--spec", spec_path,
               "--result", result_path, "--log", log]  # fmt: skip
        try:
            measured = memrun(cmd, env=env or self.env)
        except KeyboardInterrupt:  # stop our child (memwatch leaves it running), then unwind
            from memwatch import _children

            for pid in _children(os.getpid()):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    if spec_path.encode() in f.read():
                        os.kill(pid, signal.SIGTERM)
            raise
        try:
            with open(result_path) as f:
                result = json.load(f)
        except FileNotFoundError:
            result = {"ok": False, "error": f"no result (exit {measured['returncode']}); see {log}"}
        result.update(measured, log=os.path.relpath(log, ROOT))
        return result

    def variant_spec(self, variant: str, src_url: str, dest: str, sizes: dict, child_work: str):
        a = self.args
        if variant in ("floor", "floor-overlap"):
            return "floor", {
                "overlap": variant == "floor-overlap",
                "files": [
                    {"url": f"{src_url}/{rel}", "ranges": ranges}
                    for rel, ranges in sorted(sizes["files"].items())
                ],
                "dest": dest[: -len(".nemo")] + ".weights",
                "gap": int(a.floor_gap_mb * MiB),
                "block": 64 * MiB,
            }
        if variant in FLOW_VARIANTS:
            params = {
                "source": src_url,
                "destination": dest,
                "target_tp": a.target_tp,
                "overwrite": True,
                "verify": variant != "flow-noverify",
            }
            params.update(FLOW_PARAMS.get(variant, {}))
            return "flow", {"params": params}
        common = {"source": src_url, "dest": dest, "target_tp": a.target_tp, "work": child_work}
        return variant, common

    def run_variants(
        self, src_url: str, sizes: dict, flow_env: dict | None, rows: list[dict]
    ) -> list[dict]:
        """Each variant ``--repeat`` times; appends one summarized row per variant to ``rows``."""
        from s3_counter import read_counters, reset_counters

        # repetitions interleave the variants (a, b, c, a, b, c, ...): moto slows down as it
        # serves more (a multipart completion took 6 s on a fresh server, 9-13 s after a few
        # GB had passed through), so running one variant's repetitions back to back would
        # favour whichever runs first
        reps_of: dict[str, list[dict]] = {v: [] for v in self.args.variants}
        for rep in range(self.args.repeat):
            for variant in self.args.variants:
                reps = reps_of[variant]
                prefix = f"{OUT_PREFIX}/{variant}-{rep}-{uuid.uuid4().hex[:6]}"
                dest = f"s3://{prefix}/model-tp{self.args.target_tp}.nemo"
                child_work = os.path.join(self.work, f"child-{variant}-{rep}")
                os.makedirs(child_work, exist_ok=True)
                kind, spec = self.variant_spec(variant, src_url, dest, sizes, child_work)
                env = dict(self.env)
                if kind == "flow":
                    if flow_env is None:
                        raise RuntimeError("flow variants need the stack")
                    env.update(flow_env, AWS_ENDPOINT_URL_S3=self.proxy_url)
                    env["CKPT_WORK_DIR"] = child_work
                    env.pop("CKPT_SCRATCH_URL", None)  # mapped mode: stage in the work folder
                reset_counters(self.proxy_url)
                r = self.child(kind, spec, f"{variant}-{rep}", env)
                c = read_counters(self.proxy_url)
                r.update(
                    read_bytes=c["read_bytes"],
                    written_bytes=c["written_bytes"],
                    requests=c["requests"],
                    s3_errors=c["errors"],
                    s3_aborted=c["aborted"],
                    get_s=c["get_seconds"],
                    read_by_object={
                        k: v for k, v in c["get_by_object"].items() if v["bytes"] > 64 * 1024
                    },
                )
                with contextlib.suppress(FileNotFoundError):
                    target = spec.get("dest", dest)
                    r["output_bytes"] = self.fs.info(target)["size"]
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(prefix, recursive=True)
                shutil.rmtree(child_work, ignore_errors=True)
                reps.append(r)
                state = "ok" if r["ok"] else f"FAILED ({r.get('error')})"
                print(
                    f"# {variant} [{rep + 1}/{self.args.repeat}]: {r['seconds']:.1f} s, "
                    f"read {r['read_bytes'] / MB:.0f} MB, wrote {r['written_bytes'] / MB:.0f} MB, "
                    f"anon {r['peak_anon'] / MB:.0f} MB: {state}",
                    file=sys.stderr,
                )
        rows.extend(summarize(variant, reps) for variant, reps in reps_of.items())
        return rows

    def overhead(self, flow_env: dict, tiny_url: str) -> dict:
        a = self.args
        env = dict(self.env)
        env.update(flow_env, AWS_ENDPOINT_URL_S3=self.proxy_url)
        env["CKPT_WORK_DIR"] = os.path.join(self.work, "calls-work")
        env["PREFECT_WORKER_QUERY_SECONDS"] = f"{a.query_seconds:g}"  # as the workers have it
        params = {"source": tiny_url, "target_tp": 1, "target_pp": 1, "overwrite": True}
        out: dict = {"query_seconds": a.query_seconds, "runs": a.overhead_runs}
        for name, choice in (
            ("deployment-inline", {"repartition": "inline"}),
            ("deployment-as-deployed", {}),
        ):
            spec = {
                "deployment": "convert/vit",
                "params": {**params, **choice},
                "dest_prefix": f"s3://{OUT_PREFIX}/tiny-{name}",
                "job_variables": None,
                "n": a.overhead_runs,
                "warmup": 1,
            }
            r = self.child("overhead", spec, f"overhead-{name}", env)
            out[name] = r
            if r["ok"]:
                ts = [x["total_s"] for x in r["runs"] if not x["warmup"]]
                print(f"# overhead {name}: median {statistics.median(ts):.1f} s", file=sys.stderr)
            else:
                print(f"# overhead {name}: FAILED ({r.get('error')})", file=sys.stderr)
        spec = {
            "params": params,
            "dest_prefix": f"s3://{OUT_PREFIX}/tiny-calls",
            "n": a.overhead_runs,
        }
        out["in-process"] = self.child("calls", spec, "overhead-calls", env)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(OUT_PREFIX, recursive=True)
        return out


def _median_phases(reps: list[dict]) -> dict | None:
    """Each phase's median over the repetitions that timed it."""
    keys = [k for r in reps for k in (r.get("phases") or {})]
    if not keys:
        return None
    return {
        k: statistics.median(r["phases"][k] for r in reps if k in (r.get("phases") or {}))
        for k in dict.fromkeys(keys)
    }


def summarize(variant: str, reps: list[dict]) -> dict:
    ok = [r for r in reps if r["ok"]]
    use = ok or reps
    secs = [r["seconds"] for r in use]
    last = use[-1]
    return {
        "variant": variant,
        "label": VARIANTS[variant],
        "ok": bool(ok),
        "error": None if ok else reps[-1].get("error"),
        "runs": len(reps),
        "failed_runs": len(reps) - len(ok),
        "seconds": statistics.median(secs),
        "seconds_min": min(secs),
        "seconds_max": max(secs),
        "work_s": statistics.median(r.get("work_s", r["seconds"]) for r in use),
        "phases": _median_phases(use),
        "read_bytes": max(r["read_bytes"] for r in use),
        "written_bytes": max(r["written_bytes"] for r in use),
        "output_bytes": last.get("output_bytes"),
        "peak_anon": max(r["peak_anon"] for r in use),
        "peak_file": max(r["peak_file"] for r in use),
        "peak_rss": max(r["peak_rss"] for r in use),
        "requests": last.get("requests"),
        "get_s": last.get("get_s"),
        "read_by_object": last.get("read_by_object"),
        "summary": last.get("summary"),
        "log": last.get("log"),
        "reps": [{k: v for k, v in r.items() if k not in ("read_by_object", "summary")} for r in reps],
    }  # fmt: skip


# -- report -------------------------------------------------------------------------------------


def table(rows: list[dict], sizes: dict) -> str:
    w = sizes["weights_bytes"]
    floor = next((r for r in rows if r["variant"] == "floor" and r["ok"]), None)
    lines = [
        "| variant | wall s (min–max) | vs floor | in-process s | GB read from S3 | read / weights | GETs | GB written to S3 | peak anon MB | peak file MB | phases s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in rows:
        gets = (r.get("requests") or {}).get("GET", 0)
        if not r["ok"]:
            lines.append(
                f"| {r['label']} | failed: {r['error']} | | | {r['read_bytes'] / GB:.2f} | "
                f"{r['read_bytes'] / w:.2f}x | {gets} | {r['written_bytes'] / GB:.2f} | "
                f"{r['peak_anon'] / MB:.0f} | {r['peak_file'] / MB:.0f} | |"
            )
            continue
        vs = f"{r['seconds'] / floor['seconds']:.2f}x" if floor else ""
        phases = ", ".join(f"{k} {v:.1f}" for k, v in (r["phases"] or {}).items())
        lines.append(
            f"| {r['label']} | {r['seconds']:.1f} ({r['seconds_min']:.1f}–{r['seconds_max']:.1f}) | "
            f"{vs} | {r['work_s']:.1f} | {r['read_bytes'] / GB:.2f} | {r['read_bytes'] / w:.2f}x | {gets} | "
            f"{r['written_bytes'] / GB:.2f} | {r['peak_anon'] / MB:.0f} | {r['peak_file'] / MB:.0f} | {phases} |"
        )
    return "\n".join(lines)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})" if xs else ""


def overhead_table(o: dict) -> str:
    lines = [
        "| how | runs | submit → done s, median (min–max) | → picked up (Pending) | Pending → Running | Running → Completed | Completed → seen |",
        "|---|---:|---|---|---|---|---|",
    ]  # fmt: skip
    names = {
        "deployment-inline": "`convert/vit` deployment, warm worker, `repartition=inline`",
        "deployment-as-deployed": "`convert/vit` deployment as deployed (repartition → `repartition/vit` in gpu-pool)",
    }  # fmt: skip
    for key, label in names.items():
        r = o.get(key)
        if r is None:
            continue
        if not r["ok"]:
            lines.append(f"| {label} | | failed: {r['error']} | | | | |")
            continue
        runs = [x for x in r["runs"] if not x["warmup"]]
        bad = [x["state"] for x in runs if x["state"] != "COMPLETED"]
        note = f" ({len(bad)} not completed: {', '.join(bad)})" if bad else ""
        lines.append(
            f"| {label} | {len(runs)} | {_med([x['total_s'] for x in runs])}{note} | "
            f"{_med([x['pickup_s'] for x in runs])} | {_med([x['start_s'] for x in runs])} | "
            f"{_med([x['body_s'] for x in runs])} | {_med([x['seen_s'] for x in runs])} |"
        )
    c = o.get("in-process")
    if c is not None and c["ok"]:
        for key, label in (
            ("flow", "`convert_vit(...)` called in one process (flow run, no worker)"),
            ("api", "`ckptcore.api.convert` in one process (no Prefect, no verify/lineage)"),
        ):
            xs = c[key]
            lines.append(
                f"| {label} | {len(xs) - 1} | {_med(xs[1:])} (first call {xs[0]:.1f}) | | | | |"
            )
    elif c is not None:
        lines.append(f"| in-process calls | | failed: {c['error']} | | | | |")
    d = o.get("deployment-inline")
    if d and d["ok"] and c is not None and c["ok"]:
        runs = [x for x in d["runs"] if not x["warmup"]]
        total = statistics.median(x["total_s"] for x in runs)
        warm_flow = statistics.median(c["flow"][1:])
        api = statistics.median(c["api"][1:])
        lines += [
            "",
            f"Fixed cost of a deployment run (inline): {total:.1f} s submit → done, of which "
            f"{statistics.median(x['pickup_s'] for x in runs):.1f} s waiting for the worker's poll, "
            f"{statistics.median(x['start_s'] for x in runs):.1f} s starting the flow's process "
            f"(Python, imports, flow load), {statistics.median(x['body_s'] for x in runs):.1f} s "
            f"in the flow (the same call takes {warm_flow:.1f} s in a warm process, "
            f"{c['flow'][0]:.1f} s as a process's first call). Against ckptcore alone "
            f"({api:.1f} s): {total - api:.1f} s per run; against the warm in-process flow call: "
            f"{total - warm_flow:.1f} s.",
        ]
    a = o.get("deployment-as-deployed")
    spans = [x["child_s"] for x in (a or {}).get("runs", []) if not x["warmup"] and "child_s" in x]
    if spans:
        parts = ", ".join(f"{k} {statistics.median(x[k] for x in spans):.1f}" for k in spans[0])
        lines += [
            "",
            f"As deployed, the convert run's body (medians, s): before the repartition run is "
            f"created, then that run's pickup, process start and body, then the convert run "
            f"after it completed: {parts}.",
        ]
    return "\n".join(lines)


def _nice_step(top: float, ticks: int = 6) -> float:
    raw = max(top, 1e-9) / ticks
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def svg_chart(rows: list[dict], sizes: dict, title: str, subtitle: str) -> str:
    """Two horizontal bar panels: wall time (floor and 1.5x-floor lines, min-max whiskers) and
    GB read from S3 (weights, 1.05x-weights and whole-checkpoint lines). Hand-written SVG."""
    from xml.sax.saxutils import escape

    W, left, right, bar, gap = 900, 320, 30, 20, 10
    plot_w = W - left - right
    floor = next((r for r in rows if r["variant"] == "floor" and r["ok"]), None)
    colors = {"floor": "#8c8c8c", "floor-overlap": "#b0b0b0", "naive": "#c44e52", "download-convert-upload": "#dd8452",
              "ckpt-s3": "#55a868"}  # fmt: skip
    out: list[str] = []
    y = 66

    def panel(heading, value, spread, fmt, refs) -> None:
        nonlocal y
        vals = [value(r) for r in rows]
        spans = [spread(r) for r in rows]
        top = max(
            [v for v in vals if v is not None]
            + [hi for s in spans if s for _, hi in [s]]
            + [x for x, *_ in refs]
            + [1e-9]
        )
        for r, v, sp in zip(rows, vals, spans, strict=True):  # room for each value label
            if v is not None:
                room = W - 12 - left - 6.2 * len(fmt(r, v))
                top = max(top, plot_w * max(v, sp[1] if sp else 0) / max(room, 50))
        step = _nice_step(top * 1.05, 5)
        top = step * (int(top * 1.05 / step) + 1)
        out.append(f'<text x="20" y="{y}" class="h">{escape(heading)}</text>')
        y += 12
        y0, height = y, len(rows) * (bar + gap)

        def sx(v: float) -> float:
            return left + plot_w * v / top

        t = 0.0
        while t <= top + 1e-9:
            x = sx(t)
            out.append(
                f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + height}" class="grid"/>'
            )
            out.append(f'<text x="{x:.1f}" y="{y0 + height + 14}" class="tick">{t:g}</text>')
            t += step
        texts: list[str] = []  # drawn last, over the reference lines
        for i, r in enumerate(rows):
            by = y0 + i * (bar + gap) + gap / 2
            ty = by + bar * 0.72
            texts.append(
                f'<text x="{left - 8}" y="{ty:.1f}" class="label">{escape(r["label"])}</text>'
            )
            v = vals[i]
            if v is None:
                err = escape(str(r.get("error") or "")[:70])
                texts.append(f'<text x="{left + 6}" y="{ty:.1f}" class="fail">failed: {err}</text>')
                continue
            color = colors.get(r["variant"], "#4c72b0")
            out.append(
                f'<rect x="{left}" y="{by:.1f}" width="{max(sx(v) - left, 1):.1f}" height="{bar}" fill="{color}"/>'
            )
            end = sx(v)
            if spans[i] and spans[i][1] > spans[i][0]:
                lo, hi = spans[i]
                my = by + bar / 2
                out.append(
                    f'<path d="M{sx(lo):.1f},{my:.1f}H{sx(hi):.1f}M{sx(lo):.1f},{my - 4:.1f}V{my + 4:.1f}'
                    f'M{sx(hi):.1f},{my - 4:.1f}V{my + 4:.1f}" class="whisker"/>'
                )
                end = max(end, sx(hi))
            texts.append(
                f'<text x="{end + 5:.1f}" y="{ty:.1f}" class="val">{escape(fmt(r, v))}</text>'
            )
        for x, _, color, dash in refs:
            out.append(
                f'<line x1="{sx(x):.1f}" y1="{y0 - 3}" x2="{sx(x):.1f}" y2="{y0 + height + 3}" '
                f'stroke="{color}" stroke-width="1.6" stroke-dasharray="{dash}"/>'
            )
        out.extend(texts)
        lx, ly = left, y0 + height + 34
        for _, name, color, dash in refs:
            width = 36 + 6.0 * len(name)
            if lx > left and lx + width > W - 10:  # next legend line
                lx, ly = left, ly + 18
            out.append(
                f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" stroke="{color}" '
                f'stroke-width="1.6" stroke-dasharray="{dash}"/>'
            )
            out.append(f'<text x="{lx + 30}" y="{ly}" class="ref">{escape(name)}</text>')
            lx += width + 14
        y = ly + 34

    refs = []
    if floor:
        refs = [
            (floor["seconds"], f"floor {floor['seconds']:.1f} s", "#222", "5 3"),
            (1.5 * floor["seconds"], f"target ≤ 1.5× floor ({1.5 * floor['seconds']:.1f} s)",
             "#2a9d2a", "2 3"),
        ]  # fmt: skip

    def wall_fmt(r: dict, v: float) -> str:
        ratio = f" ({v / floor['seconds']:.1f}× floor)" if floor and r is not floor else ""
        return f"{v:.1f} s{ratio}"

    panel(
        "Wall time, s (median; whiskers: min–max; a fresh process per run)",
        lambda r: r["seconds"] if r["ok"] else None,
        lambda r: (r["seconds_min"], r["seconds_max"]) if r["ok"] and r["runs"] > 1 else None,
        wall_fmt,
        refs,
    )
    w = sizes["weights_bytes"] / GB
    panel(
        "Read from S3, GB (counted at a proxy in front of the S3 server)",
        lambda r: r["read_bytes"] / GB if r["ok"] else None,
        lambda r: None,
        lambda r, v: f"{v:.2f} GB ({v / w:.2f}× weights)",
        [
            (w, f"model weights {w:.2f} GB", "#222", "5 3"),
            (1.05 * w, "target ≤ 1.05× weights", "#2a9d2a", "2 3"),
            (
                sizes["checkpoint_bytes"] / GB,
                f"whole checkpoint with Adam state {sizes['checkpoint_bytes'] / GB:.2f} GB",
                "#c44e52",
                "7 3",
            ),
        ],  # fmt: skip
    )
    height = y - 14
    style = (
        "text{font-family:Helvetica,Arial,sans-serif;font-size:12px;fill:#222}"
        ".t{font-size:15px;font-weight:bold}.s{font-size:12px;fill:#555}"
        ".h{font-size:13px;font-weight:bold}"
        ".label{text-anchor:end}.tick{text-anchor:middle;font-size:10px;fill:#666}"
        ".val{font-size:11px;paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}"
        ".ref{font-size:11px}.fail{fill:#c44e52;font-style:italic}"
        ".grid{stroke:#e6e6e6;stroke-width:1}.whisker{stroke:#222;stroke-width:1.2;fill:none}"
    )
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="Helvetica,Arial,sans-serif">',
            f"<style>{style}</style>",
            f'<rect width="{W}" height="{height}" fill="white"/>',
            f'<text x="20" y="24" class="t">{escape(title)}</text>',
            f'<text x="20" y="42" class="s">{escape(subtitle)}</text>',
            *out,
            "</svg>",
            "",
        ]
    )


def write_svg(result: dict, path: str) -> None:
    a, sizes = result["args"], result["sizes"]
    title = (
        f"S3 → S3: TP={a['source_tp']} training checkpoint → TP={a['target_tp']} .nemo "
        f"(ViT-L width, {result['layers']} layers)"
    )
    moto = "ranged GETs read only the range" if a.get("fast_ranges") else "stock"
    subtitle = (
        f"{sizes['weights_bytes'] / GB:.2f} GB of fp32 weights, {sizes['checkpoint_bytes'] / GB:.2f} GB "
        f"with the Adam state; moto S3 on 127.0.0.1 ({moto}); {result['machine']['cpus']} CPUs; "
        f"{a['repeat']} run(s) each"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(svg_chart(result["rows"], sizes, title, subtitle))
    print(f"chart: {os.path.relpath(path, ROOT)}", file=sys.stderr)


def tiny_source(work: str) -> str:
    from ckptcore.sample import vit_config, write_training_checkpoint

    folder = os.path.join(work, "tiny", "checkpoints")
    cfg = vit_config("tiny", hidden=32, heads=2, ffn=64, layers=1, img=8, patch=4)
    write_training_checkpoint(folder, cfg, tp=2, step=100)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-gb", type=float, default=1.2, help="fp32 weights, GB (24 layers: 1.2)")
    ap.add_argument("--layers", type=int, help="ViT-Large-width layers (overrides --size-gb)")
    ap.add_argument("--source-tp", type=int, default=4)
    ap.add_argument("--target-tp", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", help=f"comma-separated variants: {', '.join(VARIANTS)}")
    ap.add_argument("--skip", default="", help="comma-separated variants to leave out")
    ap.add_argument("--overhead", action="store_true", help="also measure Prefect's fixed cost")
    ap.add_argument("--overhead-runs", type=int, default=5)
    ap.add_argument(
        "--query-seconds", type=float, default=1, help="PREFECT_WORKER_QUERY_SECONDS (stack: 1)"
    )
    ap.add_argument(
        "--fast-ranges",
        action="store_true",
        help="moto answers ranged GETs by reading only the range (bench/moto_ranges.py)",
    )
    ap.add_argument(
        "--floor-gap-mb", type=float, default=1.0, help="floor: merge ranges this close"
    )
    ap.add_argument("--out", default=os.path.join(HERE, "out", "e2e.json"))
    ap.add_argument("--svg", default=os.path.join(ROOT, "docs", "img", "e2e.svg"))
    ap.add_argument("--no-svg", action="store_true")
    ap.add_argument("--replot", metavar="JSON", help="only print the tables and redraw the chart")
    ap.add_argument("--no-probes", action="store_true", help="skip the proxy and moto probes")
    ap.add_argument("--work", help="parent of the temporary work folder (default: $TMPDIR)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.spec, args.result, args.log)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        print(report(result, argparse.Namespace(**result["args"])))
        write_svg(result, args.svg)
        return 0

    # Ctrl-C and SIGTERM unwind (stopping the stack, moto and the proxy), also when started
    # in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    selected = args.only.split(",") if args.only else list(VARIANTS)
    skip = set(filter(None, args.skip.split(",")))
    unknown = [v for v in [*selected, *skip] if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.variants = [v for v in selected if v not in skip]
    args.out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(args.out_dir, exist_ok=True)
    layers = args.layers or max(1, round(args.size_gb * GB / LAYER_BYTES))
    need_stack = args.overhead or any(v in FLOW_VARIANTS for v in args.variants)

    src_local, src_name = make_source(args.out_dir, layers, args.source_tp)
    sizes = weight_ranges(src_local, args.target_tp)
    print(
        f"# source: {layers} layers, TP={args.source_tp}, weights {sizes['weights_bytes'] / GB:.3f} GB, "
        f"checkpoint {sizes['checkpoint_bytes'] / GB:.3f} GB",
        file=sys.stderr,
    )
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(k, v)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)  # endpoints are always explicit here
    from s3_counter import start_proxy_process

    work = tempfile.mkdtemp(prefix="ckpt-e2e-", dir=args.work)
    result: dict = {
        "args": {
            k: v for k, v in vars(args).items() if k not in ("child", "spec", "result", "log")
        },
        "layers": layers,
        "sizes": {k: v for k, v in sizes.items() if k != "files"},
        "machine": {"cpus": os.cpu_count(), "work_fs": filesystem_of(work)},
    }
    try:
        with contextlib.ExitStack() as stack:
            moto_url = stack.enter_context(
                moto_process(os.path.join(args.out_dir, "e2e-moto.log"), args.fast_ranges)
            )
            proxy_url = stack.enter_context(start_proxy_process(moto_url))
            bench = Bench(args, work, moto_url, proxy_url)
            flow_env = None
            if need_stack:
                flow_env = stack.enter_context(local_stack(work, proxy_url, args.query_seconds))
            else:
                for b in BUCKETS:
                    bench.fs.mkdir(b)
            t0 = time.perf_counter()
            src_prefix = f"{SOURCE_PREFIX}/L{layers}-tp{args.source_tp}/checkpoints"
            upload_folder(bench.fs, src_local, src_prefix)
            print(f"# source uploaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if not args.no_probes:
                result["proxy"] = probe_proxy(moto_url, proxy_url)
                big = max(sizes["sizes"].items(), key=lambda kv: kv[1])
                result["moto_ranges"] = probe_moto_ranges(
                    moto_url, f"{src_prefix}/{big[0]}", big[1]
                )
            result["rows"] = []
            bench.run_variants(f"s3://{src_prefix}", sizes, flow_env, result["rows"])
            if args.overhead:
                assert flow_env is not None
                tiny = tiny_source(work)
                tiny_prefix = f"{SOURCE_PREFIX}/tiny-{uuid.uuid4().hex[:6]}/checkpoints"
                upload_folder(bench.fs, tiny, tiny_prefix)
                result["tiny_bytes"] = sum(
                    os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tiny) for f in fs
                )
                result["overhead"] = bench.overhead(flow_env, f"s3://{tiny_prefix}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with open(args.out, "w") as f:  # partial results too, if something above failed
            json.dump(result, f, indent=2, default=str)
        print(f"JSON: {os.path.relpath(args.out, ROOT)}", file=sys.stderr)
    print(report(result, args))
    if not args.no_svg and result.get("rows"):
        write_svg(result, args.svg)
    return 0 if all(r["ok"] for r in result.get("rows", [])) else 1


def filesystem_of(path: str) -> str:
    """The type of the file system holding ``path`` (longest mount point in /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount, fs_type = fields[1], fields[2]
                if (path + "/").startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                    best, kind = mount, fs_type
    except OSError:
        pass
    return kind


def report(result: dict, args) -> str:
    sizes = result["sizes"]
    moto = "ranged GETs read only the range" if args.fast_ranges else "stock"
    work_fs = result["machine"].get("work_fs")
    out = [
        f"## S3 → S3 (moto: {moto}), TP={args.source_tp} → TP={args.target_tp} ({result['layers']} layers: weights "
        f"{sizes['weights_bytes'] / GB:.3f} GB, whole checkpoint {sizes['checkpoint_bytes'] / GB:.3f} GB, "
        f"plan reads {sizes['plan_read_bytes'] / GB:.3f} GB, output weights {sizes['output_weight_bytes'] / GB:.3f} GB; "
        f"{args.repeat} run(s) each" + (f"; work folders on {work_fs}" if work_fs else "") + ")",
        "",
        table(result["rows"], sizes),
    ]
    p = result.get("proxy")
    if p:
        mb = p["bytes"] / MB
        out += [
            "",
            f"Counting proxy ({p['bytes'] >> 20} MiB object, best of 3): GET {mb / p['get_direct_s']:.0f} MB/s direct, "
            f"{mb / p['get_proxy_s']:.0f} MB/s through the proxy; PUT {mb / p['put_direct_s']:.0f} MB/s direct, "
            f"{mb / p['put_proxy_s']:.0f} MB/s through the proxy.",
        ]
    m = result.get("moto_ranges")
    if m:
        out += [
            "",
            f"moto ranged GETs (best of 3): 1 MiB of an 8 MiB object {m['small_1MiB_s'] * 1e3:.0f} ms; "
            f"1 MiB of a {m['big_object_bytes'] / MB:.0f} MB object {m['big_1MiB_s'] * 1e3:.0f} ms; "
            f"64 MiB of it {m['big_64MiB_s'] * 1e3:.0f} ms.",
        ]
    o = result.get("overhead")
    if o:
        settings = next(
            (
                o[k]["settings"]
                for k in ("deployment-inline", "deployment-as-deployed")
                if o[k]["ok"]
            ),
            {},
        )
        out += [
            "",
            f"## Prefect's fixed cost per run (tiny checkpoint, {result['tiny_bytes'] / 1e3:.0f} KB, TP=2 → TP=1; "
            f"settings: {', '.join(f'{k}={v}' for k, v in settings.items())})",
            "",
            overhead_table(o),
        ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
