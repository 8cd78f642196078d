"""The embedded default: a sample training checkpoint -> the ``convert`` flow -> a checked .nemo.

    python -m flows.demo          # local paths, Prefect's ephemeral API (no server), ~1 min
    python -m flows.demo --s3     # against the local stack (make serve; make demo-s3)

It writes a realistic NeMo training checkpoint folder (tiny ViT, TP=2, Adam state) under
``demo-out/``, runs ``convert`` to a TP=1 ``.nemo`` with lineage, restores that ``.nemo`` with
``VitClassificationModel.restore_from``, checks its logits against the source's, and prints
where everything went. With ``--s3`` the checkpoint goes to the stack's S3 and the run is the
``convert/vit`` deployment (its repartition step runs in ``gpu-pool``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

OUT = "demo-out"
TOLERANCE = 1e-5


def _configure_local_prefect(out: str) -> None:
    """Prefect's ephemeral API with its database under ``demo-out/`` (before importing it)."""
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_HOME"] = os.path.join(out, "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("CKPT_WORK_DIR", os.path.join(out, "work"))


def _write_sample(folder: str) -> tuple[str, dict[str, Any]]:
    from ckptcore.sample import vit_config, write_training_checkpoint

    shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
    config = vit_config("tiny", tp=2)
    name, _ = write_training_checkpoint(folder, config, tp=2, optimizer=True, step=100)
    return name, config


def _max_logit_diff(source: str, nemo: str) -> float:
    import torch

    from ckptcore.api import restore_model, sample_images

    a = restore_model(source)  # VitClassificationModel.restore_from
    b = restore_model(nemo)
    images = sample_images(a.cfg, count=8, seed=123)
    with torch.no_grad():
        return float((a(images) - b(images)).abs().max())


def _print_report(
    title: str, places: dict[str, str], record: dict[str, Any], diff: float, seconds: float
) -> None:
    width = max(len(k) for k in places)
    print(f"\n{title}")
    for key, value in places.items():
        print(f"  {key:<{width}}  {value}")
    print("\nlineage summary")
    summary = {
        "source": record["source"],
        "checkpoint": record["checkpoint"],
        "step / epoch": f"{record['step']} / {record['epoch']}",
        "layout": f"TP={record['source_tp']} PP={record['source_pp']} -> "
        f"TP={record['target_tp']} PP={record['target_pp']}",
        "source files": ", ".join(
            f"{f['url'].rsplit('/', 2)[-2]}/… {f['size_bytes']:,} B sha256 {f['sha256'][:12]}…"
            for f in record["source_files"]
        ),
        "output": f"{record['output']['size_bytes']:,} B sha256 {record['output']['sha256']}",
        "verify (flow)": f"max |logit diff| {record['verify']['max_abs_diff']:.3g} "
        f"on {record['verify']['images']} images ({record['verify']['device']}; "
        f"{record['verify'].get('method', 'logits')})",
        "flow run": f"{record['run']['flow_name']}/{record['run']['flow_run_name']} "
        f"({record['run']['flow_run_id']})",
        "deployment": record["run"]["deployment_name"] or "- (local run)",
        "versions": ", ".join(f"{k} {v}" for k, v in sorted(record["versions"].items())),
        "timings": ", ".join(f"{k} {v:.2f}s" for k, v in record["timings"].items()),
    }
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
    print(
        f"\nrestored .nemo vs source: max |logit diff| {diff:.3g} (<= {TOLERANCE:g}): OK"
        f"\ndemo finished in {seconds:.1f}s"
    )


def run_local(out: str) -> None:
    """Local folders, ephemeral Prefect API."""
    start = time.perf_counter()
    _configure_local_prefect(out)
    training = os.path.join(out, "training", "run-1", "checkpoints")
    dest = os.path.join(out, "models", "vit-tp1.nemo")
    print(f"writing a sample training checkpoint (tiny ViT, TP=2, with Adam state) to {training}")
    name, _ = _write_sample(training)
    print("running the convert flow on Prefect's ephemeral API (first start takes a while)")
    from flows.convert import convert_vit

    convert_vit(
        source=training,
        destination=dest,
        target_tp=1,
        target_pp=1,
        overwrite=True,
        repartition="inline",
    )
    diff = _max_logit_diff(training, dest)
    if not diff <= TOLERANCE:
        sys.exit(f"demo: restored .nemo differs from the source: max |logit diff| {diff:.3g}")
    with open(dest + ".lineage.json", encoding="utf-8") as f:
        record = json.load(f)
    _print_report(
        "where everything went",
        {
            "training checkpoint": f"{training}/mp_rank_0{{0,1}}/{name}",
            ".nemo (TP=1)": dest,
            "lineage sidecar": dest + ".lineage.json",
            "lineage in the archive": f"{dest} -> ./lineage.json",
            "Prefect database": os.path.join(os.environ["PREFECT_HOME"], "prefect.db"),
            "artifacts": "lineage-vit-tp1-nemo, source-files-vit-tp1-nemo (run "
            "`PREFECT_HOME=demo-out/prefect prefect server start` to browse them)",
        },
        record,
        diff,
        time.perf_counter() - start,
    )


def run_s3(out: str) -> None:
    """The local stack: S3 (moto) and the ``convert/vit`` deployment on the workers."""
    start = time.perf_counter()
    missing = [v for v in ("PREFECT_API_URL", "AWS_ENDPOINT_URL_S3") if not os.environ.get(v)]
    if missing:
        sys.exit(
            f"demo --s3: {', '.join(missing)} not set; start the stack (make serve) and "
            "source its environment (. deployments/.run/env), or use make demo-s3"
        )
    import fsspec
    from prefect.deployments import run_deployment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    training = os.path.join(out, "training", "run-s3", "checkpoints")
    src = f"s3://ckpt-training/demo/{stamp}/checkpoints"
    dest = f"s3://ckpt-models/demo/{stamp}/vit-tp1.nemo"
    name, _ = _write_sample(training)
    fs = fsspec.filesystem("s3")
    fs.put(training + "/", src.removeprefix("s3://") + "/", recursive=True)
    print(f"uploaded a sample training checkpoint (tiny ViT, TP=2) to {src}")
    print("running deployment convert/vit (repartition runs as repartition/vit in gpu-pool)")
    run = run_deployment(
        "convert/vit",
        parameters={"source": src, "destination": dest, "target_tp": 1, "target_pp": 1},
        timeout=600,
    )
    if run.state is None or not run.state.is_completed():
        sys.exit(f"demo --s3: run {run.name} ended {run.state.name if run.state else '?'}")
    local = os.path.join(out, "models", f"vit-tp1-{stamp}.nemo")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fs.get_file(dest.removeprefix("s3://"), local)
    diff = _max_logit_diff(training, local)
    if not diff <= TOLERANCE:
        sys.exit(f"demo --s3: restored .nemo differs from the source: max |logit diff| {diff:.3g}")
    record = json.loads(fs.cat_file(dest.removeprefix("s3://") + ".lineage.json"))
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    _print_report(
        "where everything went",
        {
            "training checkpoint": f"{src}/mp_rank_0{{0,1}}/{name}",
            ".nemo (TP=1)": dest,
            "lineage sidecar": dest + ".lineage.json",
            "object metadata": json.dumps(fs.metadata(dest.removeprefix("s3://")))[:120] + "…",
            "downloaded copy": local,
            "flow run (UI)": f"{ui}/runs/flow-run/{run.id}",
        },
        record,
        diff,
        time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample checkpoint -> convert flow -> .nemo")
    parser.add_argument("--s3", action="store_true", help="use the local stack (make serve)")
    parser.add_argument("--out", default=OUT, help="output folder (default: demo-out)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.s3:
        run_s3(out)
    else:
        run_local(out)


if __name__ == "__main__":
    main()
