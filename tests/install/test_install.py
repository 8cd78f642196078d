"""The base install (``pip install <checkout>``, no extras) in a clean virtual environment runs
``ckpt`` over the real NeMo files without Prefect or transformers (``check_install.py``).

The environment is kept in ``build/venv-base`` and rebuilt from scratch whenever
``pyproject.toml`` or ``constraints.txt`` change; otherwise only this project is reinstalled.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "build" / "venv-base"


def _dependencies_digest() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def test_base_install_runs_the_cli_on_real_nemo_files() -> None:
    stamp = VENV / "ckpt-install-check.digest"
    digest = _dependencies_digest()
    reuse = stamp.exists() and stamp.read_text() == digest
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/install/check_install.py"), str(VENV)]
        + (["--reuse"] if reuse else []),
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("OK")
    assert "prefect" not in proc.stdout.split("installed:")[1].split("\n")[0]
    stamp.write_text(digest)
