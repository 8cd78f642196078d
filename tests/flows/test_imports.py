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


def test_a_fresh_flow_process_verifies_in_a_verify_process_a_warm_one_in_itself() -> None:
    """``verify_process="auto"``: the verify process pays off only while torch is not yet
    imported here (its point is importing it elsewhere, meanwhile); a run leaves it idle for
    the next run in the process, which does not import again."""
    _python(
        "import os, sys\n"
        "from tasks.convert import _VERIFIERS, close_idle_verifiers, release_verifier\n"
        "from tasks.convert import start_verifier\n"
        "key = start_verifier()\n"
        "assert key is not None and _VERIFIERS[key].alive()\n"
        "proc = _VERIFIERS[key]\n"
        "release_verifier(key)\n"
        "again = start_verifier()\n"
        "assert _VERIFIERS[again] is proc, 'the next run reuses the idle one'\n"
        "release_verifier(again)\n"
        "close_idle_verifiers()\n"
        "assert proc._proc.wait(60) == 0\n"
        "import torch\n"
        "assert start_verifier() is None\n"
    )
