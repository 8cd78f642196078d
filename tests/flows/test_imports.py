"""A flow's process loads it without importing torch (~1.5 s here): the steps that need torch
import it, and a run handed to another pool never does in the parent until verify."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_flow_modules_load_without_torch() -> None:
    _python(
        "import sys\n"
        "import flows.convert, flows.repartition, flows.reshard\n"
        "assert 'torch' not in sys.modules, 'a flow module imports torch at load time'\n"
    )
