"""Install ckpt-pipeline into a clean virtual environment, as a NeMo user would, and run the ``ckpt``
command over the real NeMo files there.

    python tests/install/check_install.py VENV [--torch SPEC] [--reuse] [--no-constraints]

Only the base install (no extras): the check fails if Prefect, transformers or a top-level
``tasks``/``flows`` module is importable there, or if ``import ckptcore`` imports Prefect.
``--torch SPEC`` installs that torch first (e.g. ``torch==2.1.2``) to check the oldest supported
release. ``--reuse`` keeps the dependencies of an earlier run in VENV and reinstalls only this
project. Prints what it did with timings; exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "nemo-2.3.2"
FORBIDDEN = ("prefect", "transformers", "tasks", "flows", "prefect_dask", "dask")


def step(what: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    print(f"{time.perf_counter() - start:6.1f}s  {what}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"FAILED: {what}\n$ {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--torch", help="a torch requirement to install first")
    parser.add_argument("--reuse", action="store_true", help="keep VENV's dependencies")
    parser.add_argument(
        "--no-constraints", action="store_true", help="resolve freely (no constraints.txt)"
    )
    args = parser.parse_args()
    venv = args.venv.resolve()
    py, ckpt = venv / "bin" / "python", venv / "bin" / "ckpt"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not (args.reuse and py.exists()):
        shutil.rmtree(venv, ignore_errors=True)
        step("create the virtual environment", [sys.executable, "-m", "venv", str(venv)])
    constraints = [] if args.no_constraints else ["-c", str(ROOT / "constraints.txt")]
    if args.torch:
        step(f"install {args.torch}", [*pip, args.torch, "numpy<2"])
        constraints = []  # the torch asked for, not the pinned one
    if args.reuse:
        step(
            "reinstall this project",
            [*pip, *constraints, "--no-deps", "--force-reinstall", str(ROOT)],
        )
    step("pip install <checkout>", [*pip, *constraints, str(ROOT)])

    listing = step("pip list", [str(py), "-m", "pip", "list", "--format", "json"]).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(listing)}
    print("        installed: " + ", ".join(f"{n}=={v}" for n, v in sorted(installed.items())))
    probe = (
        "import importlib.util, sys, ckptcore, ckptcore.api, ckptcore.cli, ckptcore.community.api;"
        "assert 'prefect' not in sys.modules, 'import ckptcore imported prefect';"
        f"found = [m for m in {FORBIDDEN!r} if importlib.util.find_spec(m)];"
        "assert not found, f'importable: {found}';"
        "import torch; print(torch.__version__)"
    )
    torch_version = step("import ckptcore without Prefect", [str(py), "-c", probe], cwd="/").stdout
    print(f"        torch {torch_version.strip()}")
    step("ckpt --version", [str(ckpt), "--version"])

    with tempfile.TemporaryDirectory(prefix="ckpt-install-") as tmp:
        out = Path(tmp)
        run = FIXTURES / "training" / "tp2_ft"  # finetune head, one class token: exports to HF
        commands = [
            ("inspect a training folder", ["inspect", run / "checkpoints", "--json"]),
            ("convert TP=2 -> TP=1", ["convert", run / "checkpoints", out / "tp1.nemo", "--target-tp", "1"]),
            ("reshard TP=1 -> TP=2 PP=3", ["reshard", out / "tp1.nemo", out / "tp2pp3.nemo", "--target-tp", "2", "--target-pp", "3"]),
            ("verify against NeMo's save_to", ["verify", run / "tp2_ft.nemo", out / "tp2pp3.nemo"]),
            ("verify with both models run", ["verify", run / "tp2_ft.nemo", out / "tp1.nemo", "--run-both"]),
            ("restore a bf16 O2 .nemo", ["inspect", FIXTURES / "bf16_o2" / "o2_tp2.nemo"]),
            ("export-hf", ["export-hf", out / "tp1.nemo", out / "hf"]),
            ("import-hf", ["import-hf", out / "hf", out / "from-hf.nemo", "--target-tp", "2"]),
            ("verify the HF round trip", ["verify", out / "tp1.nemo", out / "from-hf.nemo"]),
        ]  # fmt: skip
        for what, command in commands:
            step(f"ckpt {what}", [str(ckpt), *map(str, command)], cwd="/")
        logits = (
            "import json, sys, torch; from ckptcore.model.vit import VitClassificationModel;"
            f"d = json.load(open({str(run / 'expected.json')!r}));"
            f"m = VitClassificationModel.restore_from({str(out / 'tp2pp3.nemo')!r});"
            "x, want = torch.tensor(d['input']), torch.tensor(d['logits_after_fit']);"
            "diff = float((m(x) - want).abs().max()); print(diff); assert diff <= 1e-5, diff"
        )
        diff = step(
            "NeMo's logits after training, from TP=2 PP=3", [str(py), "-c", logits], cwd="/"
        )
        print(f"        max |logit difference| {diff.stdout.strip()}")
    print("OK")


if __name__ == "__main__":
    main()
