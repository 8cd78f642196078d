"""Benchmark: N ``training.checkpoint.saved`` events at once on the local stack.

Starts the local stack (``deployments/serve.sh``: Prefect server, moto's S3, the work pools, every
deployment, one worker per pool) in a temporary folder on free ports, uploads the real NeMo
training folder ``tests/fixtures/nemo-2.3.2/training/tp2_a/checkpoints`` under N prefixes
(``s3://ckpt-training/<run>-<i>/checkpoints``: identical bytes), posts one ``POST /events``
carrying N events (the README's ``curl`` with N events), and times until the N lineage sidecars
exist; then counts the ``convert`` flow runs by final state, and stops the stack.

Usage: ``python bench/events_bench.py [--events 8,16] [--timeout 900]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from e2e_bench import free_port  # noqa: E402

SOURCE = os.path.join(ROOT, "tests", "fixtures", "nemo-2.3.2", "training", "tp2_a", "checkpoints")
NAME = "megatron_vit_classification--val_loss=0.00-step=2-consumed_samples=4.0-last.ckpt"


def post(api: str, path: str, body: object) -> bytes:
    req = urllib.request.Request(
        api + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as reply:
        return reply.read()


def run_states(api: str, since: str) -> dict[str, int]:
    """Final states of the ``convert`` flow runs started since ``since``."""
    body = {
        "flows": {"name": {"any_": ["convert"]}},
        "flow_runs": {"start_time": {"after_": since}},
        "limit": 200,
    }
    runs = json.loads(post(api, "/flow_runs/filter", body))
    states: dict[str, int] = {}
    for run in runs:
        states[run["state_type"]] = states.get(run["state_type"], 0) + 1
    return states


def one_burst(api: str, fs, count: int, timeout: float) -> dict:
    tag = uuid.uuid4().hex[:6]
    prefixes = [f"ckpt-training/burst-{tag}-{i}/checkpoints" for i in range(count)]
    for prefix in prefixes:
        fs.put(SOURCE + "/", prefix + "/", recursive=True)
    now = dt.datetime.now(dt.UTC)
    events = [
        {
            "id": str(uuid.uuid4()),
            "occurred": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "event": "training.checkpoint.saved",
            "resource": {"prefect.resource.id": f"training.job.burst-{tag}-{i}"},
            "payload": {"checkpoint_url": f"s3://{prefix}/mp_rank_00/{NAME}"},
        }
        for i, prefix in enumerate(prefixes)
    ]
    sidecars = [f"{p}/nemo/{NAME[: -len('.ckpt')]}.nemo.lineage.json" for p in prefixes]
    start = time.perf_counter()
    post(api, "/events", events)
    done: set[str] = set()
    while time.perf_counter() - start < timeout and len(done) < count:
        for s in sidecars:
            if s not in done and fs.exists(s):
                done.add(s)
        fs.invalidate_cache()
        time.sleep(0.5)
    wall = time.perf_counter() - start
    time.sleep(5)  # runs end just after their sidecar
    states = run_states(api, (now - dt.timedelta(seconds=5)).isoformat())
    return {"events": count, "converted": len(done), "wall": wall, "states": states}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", default="8,16")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    stack = tempfile.mkdtemp(prefix="ckpt-events-")
    env = dict(
        os.environ,
        CKPT_STACK_DIR=stack,
        CKPT_PREFECT_PORT=str(free_port()),
        CKPT_MOTO_PORT=str(free_port()),
    )
    env.pop("AWS_ENDPOINT_URL_S3", None)
    subprocess.run([os.path.join(ROOT, "deployments", "serve.sh")], env=env, check=True)
    rows = []
    try:
        api = f"http://127.0.0.1:{env['CKPT_PREFECT_PORT']}/api"
        os.environ.update(
            AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{env['CKPT_MOTO_PORT']}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for count in (int(n) for n in args.events.split(",")):
            rows.append(one_burst(api, fs, count, args.timeout))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        subprocess.run([os.path.join(ROOT, "deployments", "stop.sh")], env=env, check=False)
    print(f"{time.strftime('%Y-%m-%d')}, `python bench/events_bench.py --events {args.events}`\n")
    print("| events | converted (sidecars) | convert runs by final state | wall time |")
    print("|---|---|---|---|")
    for r in rows:
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(r["states"].items()))
        print(f"| {r['events']} | {r['converted']} | {states} | {r['wall']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
