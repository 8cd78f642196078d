"""``ckpt`` run in the test's own process, as a user's shell would run it."""

from __future__ import annotations

import contextlib
import io

from ckptcore.cli import main


def run_cli(*args: object) -> tuple[int, str, str]:
    """``ckpt ARGS`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's exit, as the process would end
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()
