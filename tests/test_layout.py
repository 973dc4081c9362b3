"""The tree's layout rules: the import policy of orchestrator/__init__.py, no import cycles, no Ray
or MLflow in capi_core, and names that several modules must agree on defined once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from capi_core.eval.online_probe import PROBE_METRIC
from orchestrator.sweep.spec import Search

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("capi_core", "orchestrator")
HEAVY = ("torch", "ray", "mlflow", "pyarrow")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def local_imports(tree: ast.AST) -> list[ast.stmt]:
    return [node for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_blocks(tree: ast.AST) -> list[list[ast.stmt]]:
    """Runs of consecutive import statements inside functions."""
    blocks = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                for body in (getattr(node, f, None) for f in ("body", "orelse", "finalbody")):
                    run: list[ast.stmt] = []
                    for stmt in (body if isinstance(body, list) else []) + [None]:
                        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                            run.append(stmt)
                        elif run:
                            blocks.append(run)
                            run = []
    return blocks


def test_every_deferred_import_says_why():
    """A function-local import carries a '# deferred:' comment, on its line or above its block."""
    silent = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        for block in import_blocks(ast.parse("\n".join(lines))):
            first = block[0].lineno - 1
            if "# deferred" in lines[first - 1]:
                continue
            silent += [f"{path.relative_to(REPO)}:{s.lineno}" for s in block if "deferred" not in lines[s.lineno - 1]]
    assert not silent, f"function-local imports without a '# deferred:' reason: {silent}"


def test_only_the_command_defers_our_own_modules():
    """Outside orchestrator/cli/ our own modules are imported at the top (no cycle forces otherwise)."""
    deferred = []
    for name, path in modules().items():
        if name.startswith("orchestrator.cli"):
            continue
        for node in local_imports(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (module or "").split(".")[0] in PACKAGES:
                deferred.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not deferred, deferred


def _top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports when it is imported (its module-level imports)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known  # parents are imported too
    out.discard(name)
    return out


def test_no_import_cycles():
    found = modules()
    graph = {name: _top_level_imports(name, path, set(found)) for name, path in found.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1 and not name.startswith(dep + "."):  # a package's own submodules are fine
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(dep):] + [name, dep])}")
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def _imported_by(code: str) -> list[str]:
    probe = f"{code}; import sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_capi_core_imports_neither_ray_nor_mlflow():
    every = "; ".join(f"import {name}" for name in modules() if name.startswith("capi_core"))
    assert not {"ray", "mlflow"} & set(_imported_by(every))


def test_the_command_starts_without_heavy_imports():
    """``capi --help`` loads every command's module: none may import torch, Ray, MLflow or pyarrow."""
    assert _imported_by("import orchestrator.cli") == []


def test_the_sweep_metric_default_is_the_trainer_probe_metric():
    # spec.py cannot import online_probe (torch) to read the name, so the two are held equal here.
    assert Search.model_fields["metric"].default == PROBE_METRIC


def test_sweep_status_reads_files_without_torch_ray_or_mlflow():
    """``capi sweep status`` answers from the sweep's files: importing torch, Ray or MLflow for it took
    seconds (16.7 s once on 2 busy cores)."""
    used = _imported_by("import orchestrator.sweep.storage, orchestrator.sweep.console, orchestrator.uris")
    assert not {"torch", "ray", "mlflow"} & set(used), used
