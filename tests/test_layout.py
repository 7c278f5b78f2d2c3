"""The shape of the code: packages by stage with imports one way, entry points that only parse
arguments, one module owning the model folder's names, errors importable without the stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what each package may import from app (besides itself); imports run one way, top down
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "train": {"core", "data"},
    "serve": {"core", "data", "train"},
    "tune": {"core", "data", "train"},
    "run": {"core", "data", "train", "serve", "tune"},
}


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT / "app").with_suffix("").parts
    return parts[0]


def _app_imports(path: Path) -> set[str]:
    """The app packages a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "app" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
    return found


def test_imports_run_one_way_between_the_stage_packages():
    wrong = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        if path.name == "__init__.py" and path.parent == ROOT / "app":
            continue
        pkg = _package(path)
        for imported in _app_imports(path) - {pkg} - ALLOWED[pkg]:
            wrong.append(f"{path.relative_to(ROOT)} imports app.{imported}")
    assert not wrong, "\n".join(wrong)


def test_every_package_says_what_it_owns_and_may_import():
    for pkg in ("core", "data", "train", "serve"):
        doc = ast.get_docstring(ast.parse((ROOT / "app" / pkg / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"app/{pkg}/__init__.py: no docstring on its imports"


def test_entry_points_only_parse_arguments_and_call_the_library():
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert "main" in defs, f"{path.name}: no main()"
        assert defs <= {"main", "build_parser", "_stages"}, f"{path.name} defines {defs}"
        assert len(path.read_text().splitlines()) <= 80, f"{path.name} is not a thin entry point"


def test_the_model_folder_names_live_in_one_module():
    names = ('"model.json"', '"weights.pt"', '"rated_items.npz"', '"item_popularity.npy"',
             '"sharding_plan.json"', '"metrics.json"', '"history.json"', '"mlflow.json"',
             'startswith("models:/")', "startswith((\"models:/\"")
    owner = ROOT / "app" / "train" / "model_folder.py"
    found = [f"{p.relative_to(ROOT)}: {n}" for p in sorted((ROOT / "app").rglob("*.py"))
             if p != owner for n in names if n in p.read_text()]
    assert not found, "\n".join(found)
    assert all(n in owner.read_text() for n in names[:8])


def test_the_command_line_catches_errors_without_loading_torch_or_ray():
    code = ("import sys, app.core.cli, app.core.errors; "
            "print(sorted(m for m in ('torch', 'ray', 'torchrec') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", f"importing the CLI loaded {out}"
