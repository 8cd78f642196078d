"""End to end with real processes: deployments/serve.sh (a Prefect server, moto's S3 server,
the work pools, ``prefect deploy --all``, a process worker per pool), then
``prefect deployment run convert/vit --watch``, then a training event that triggers a run,
then deployments/stop.sh, which runs even when the test fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest
import torch
from flow_helpers import clear_s3_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, ".venv", "bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_env(path: str) -> dict[str, str]:
    env = {}
    with open(path) as f:
        for line in f:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                env[key] = value
    return env


def _api(base: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        data = resp.read()
    return json.loads(data) if data else None


def _flow_runs(api: str, flow: str) -> list[dict]:
    return _api(api, "/flow_runs/filter", {"flows": {"name": {"any_": [flow]}}, "limit": 50})


def _kill_leftovers(stack: str) -> None:
    """Last resort if stop.sh failed: the process groups serve.sh recorded, nothing else."""
    for name in ("cpu-worker", "gpu-worker", "server", "moto"):
        pidfile = os.path.join(stack, f"{name}.pid")
        if not os.path.exists(pidfile):
            continue
        pid = int(open(pidfile).read().strip() or 0)
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_deployed_convert_run_and_training_event(tmp_path, monkeypatch):
    from flow_helpers import make_sample

    from ckptcore.api import load_state_dict
    from ckptcore.lineage import LineageRecord

    stack = str(tmp_path / "stack")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "AWS_ENDPOINT", "CKPT_")) and k != "PYTEST_CURRENT_TEST"
    }
    env.update(
        CKPT_STACK_DIR=stack,
        CKPT_PREFECT_PORT=str(_free_port()),
        CKPT_MOTO_PORT=str(_free_port()),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",  # no cron sweep during the test
        CKPT_RETRY_BACKOFF="0",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        started = time.monotonic()
        serve = subprocess.run(
            [os.path.join(ROOT, "deployments", "serve.sh")],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert serve.returncode == 0, serve.stdout + serve.stderr
        print(f"serve.sh: {time.monotonic() - started:.1f}s")
        stack_env = _read_env(os.path.join(stack, "env"))
        api = stack_env["PREFECT_API_URL"]
        cli_env = {**env, **stack_env}
        for key, value in stack_env.items():
            monkeypatch.setenv(key, value)
        clear_s3_cache()
        import fsspec

        s3 = fsspec.filesystem("s3")

        # 1. A TP=2 training checkpoint in S3 -> `prefect deployment run convert/vit --watch`.
        src = "s3://ckpt-training/e2e/run-1/checkpoints"
        dest = "s3://ckpt-models/e2e/run-1/vit-tp1.nemo"
        sample = make_sample(tmp_path, s3, src, tp=2, step=100)
        started = time.monotonic()
        run = subprocess.run(
            [
                os.path.join(BIN, "prefect"),
                "deployment",
                "run",
                "convert/vit",
                "--param",
                f"source={src}",
                "--param",
                f"destination={dest}",
                "--param",
                "target_tp=1",
                "--watch",
            ],
            env=cli_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        print(f"deployment run --watch: {time.monotonic() - started:.1f}s")

        _, out = load_state_dict(dest)
        for key, value in sample.state_dict.items():
            if value is not None:
                assert torch.equal(out[key], value), key
        record = LineageRecord.from_json(s3.cat_file(dest.removeprefix("s3://") + ".lineage.json"))
        assert record.run.deployment_name == "convert/vit"
        assert record.verify is not None and record.verify.passed
        assert "repartition-handoff" in record.timings
        assert any("in work pool gpu-pool" in note for note in record.notes), record.notes

        # The repartition step ran as repartition/vit in gpu-pool, as a child of this run.
        parent = next(r for r in _flow_runs(api, "convert") if r["id"] == record.run.flow_run_id)
        assert parent["work_pool_name"] == "cpu-pool"
        children = _flow_runs(api, "repartition")
        assert len(children) == 1
        child = children[0]
        assert child["work_pool_name"] == "gpu-pool"
        assert child["state"]["type"] == "COMPLETED"
        link = _api(api, f"/task_runs/{child['parent_task_run_id']}")
        assert link["flow_run_id"] == parent["id"]
        assert s3.find("ckpt-scratch") == []  # the scratch partition was cleaned up

        # 2. A training job without Prefect announces a checkpoint with one curl.
        second = make_sample(
            tmp_path, s3, "s3://ckpt-training/e2e/run-2/checkpoints", tp=2, step=200, last=False
        )
        ckpt_url = f"s3://ckpt-training/e2e/run-2/checkpoints/mp_rank_00/{second.name}"
        event = [
            {
                "id": str(uuid.uuid4()),
                "occurred": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": "training.checkpoint.saved",
                "resource": {"prefect.resource.id": "training.job.e2e-run-2"},
                "payload": {"checkpoint_url": ckpt_url},
            }
        ]
        started = time.monotonic()
        curl = shutil.which("curl")
        if curl:
            subprocess.run(
                [
                    curl,
                    "-fsS",
                    "-X",
                    "POST",
                    f"{api}/events",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    json.dumps(event),
                ],
                check=True,
                timeout=30,
            )
        else:
            _api(api, "/events", event)
        expected = f"s3://ckpt-training/e2e/run-2/checkpoints/nemo/{second.name.removesuffix('.ckpt')}.nemo"
        deadline = time.monotonic() + 150
        triggered = []
        while time.monotonic() < deadline:
            triggered = [
                r for r in _flow_runs(api, "convert") if r["parameters"].get("source") == ckpt_url
            ]
            if triggered and triggered[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"):
                break
            time.sleep(2)
        assert triggered, "the training event started no convert run"
        assert triggered[0]["state"]["type"] == "COMPLETED", triggered[0]["state"]
        print(f"event -> completed run: {time.monotonic() - started:.1f}s")
        assert s3.exists(expected.removeprefix("s3://") + ".lineage.json")
        _, out2 = load_state_dict(expected)
        for key, value in second.state_dict.items():
            if value is not None:
                assert torch.equal(out2[key], value), key
    finally:
        started = time.monotonic()
        stop = subprocess.run(
            [os.path.join(ROOT, "deployments", "stop.sh")],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
        )
        print(f"stop.sh: {time.monotonic() - started:.1f}s rc={stop.returncode}")
        _kill_leftovers(stack)
        clear_s3_cache()
