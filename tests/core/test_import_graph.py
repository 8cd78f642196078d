"""ckptcore's modules import each other without cycles, and importing ckptcore brings no Prefect."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ckptcore"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the ckptcore modules it imports, anywhere in the file (lazy imports count)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle() -> None:
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_importing_ckptcore_brings_no_prefect() -> None:
    code = (
        "import sys, ckptcore, ckptcore.api, ckptcore.cli, ckptcore.community.api;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'tasks'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if "os.environ" in path.read_text() or "getenv(" in path.read_text()
    )
    assert readers == ["ckptcore/settings.py"]


# What the Prefect layer may import of ckptcore: the surface (``ckptcore.api``, whose module
# docstring lists the pipeline's steps), the records and errors, the settings, the verify
# process, the community import, and the sample generator (the demo).
SURFACE = {
    "ckptcore",
    "ckptcore.api",
    "ckptcore.community.api",
    "ckptcore.errors",
    "ckptcore.lineage",
    "ckptcore.sample",
    "ckptcore.settings",
    "ckptcore.verify_process",
}


def test_tasks_and_flows_reach_ckptcore_through_its_surface() -> None:
    root = PACKAGE.parent
    used: dict[str, set[str]] = {}
    for folder in ("tasks", "flows"):
        for path in sorted((root / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckptcore"):
                    module = node.module or ""
                    if module == "ckptcore":  # from ckptcore import lineage, ...
                        names = {f"ckptcore.{a.name}" for a in node.names}
                    else:
                        names = {module}
                    used.setdefault(str(path.relative_to(root)), set()).update(names)
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.startswith("ckptcore"):
                            used.setdefault(str(path.relative_to(root)), set()).add(a.name)
    assert used, "no ckptcore imports found: the test reads the wrong folders"
    outside = {f: sorted(m - SURFACE) for f, m in used.items() if m - SURFACE}
    assert outside == {}, f"tasks/flows import ckptcore internals: {outside}"
