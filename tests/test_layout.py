"""The house rules, checked on the source: modules stay small, the wings use only each other's
public names, nothing reaches into a dependency's private names, and importing vqlog changes no
process-wide state (log levels, warning filters, the environment, the plot backend)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vqlog"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_use_public_names_only(path):
    """No `from vqlog.x import _y` across modules, and nothing private of optuna or mlflow:
    neither a private module (`optuna.storages._rdb`) nor a private name."""
    bad = []
    for module, names, line in _imports(ast.parse(path.read_text())):
        top = module.split(".")[0]
        if top in ("vqlog", "optuna", "mlflow"):
            if any(_private(part) for part in module.split(".")) or any(map(_private, names)):
                bad.append(f"line {line}: {module} {names}")
    assert not bad, bad


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_attribute_of_another_object_is_touched(path):
    """`x._name` only on self or cls: a dependency's `study._storage` or `trial._trial_id`
    would pin it and break on upgrade."""
    bad = [f"line {node.lineno}: .{node.attr}" for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Attribute) and _private(node.attr)
           and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
    assert not bad, bad


def test_importing_vqlog_changes_no_process_wide_state():
    """Every module imported in a fresh interpreter, after its dependencies: the warning
    filters, the environment, the log levels of optuna, mlflow and alembic, Optuna's verbosity
    and matplotlib's backend are what they were before."""
    names = [_module_name(p) for p in MODULES]
    script = f"""
import json, logging, os, sys, warnings
# The dependencies first: what their own imports do (torch adds warning filters) is theirs.
import matplotlib, numpy, optuna, pandas, scipy.signal, sqlalchemy, torch, yaml
import mlflow, vector_quantize_pytorch

def state():
    return {{
        "filters": [repr(f) for f in warnings.filters],
        "environ": dict(os.environ),
        "levels": {{n: logging.getLogger(n).level for n in ("optuna", "mlflow", "alembic")}},
        "verbosity": optuna.logging.get_verbosity(),
        "backend": repr(dict.__getitem__(matplotlib.rcParams, "backend")),
        "pyplot": "matplotlib.pyplot" in sys.modules,
    }}

before = state()
import importlib
for name in {names!r}:
    importlib.import_module(name)
print(json.dumps([before, state()]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in before:
        assert after[key] == before[key], key
