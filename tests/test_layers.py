"""Imports point one way: flows -> tasks -> families -> data (docs/design.md, Layers)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWER = ["data", "nets", "detection", "segmentation", "configs"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_prefect_or_upper_layer_imports_below_tasks():
    for pkg in LOWER:
        for path in (ROOT / pkg).rglob("*.py"):
            mods = imported_modules(path)
            assert "prefect" not in mods and "prefect_dask" not in mods, path
            assert not mods & {"flows", "tasks"}, f"{path} imports an upper layer: {mods & {'flows', 'tasks'}}"


def test_tasks_do_not_import_flows():
    for path in (ROOT / "tasks").rglob("*.py"):
        assert "flows" not in imported_modules(path), path


def test_families_import_without_prefect():
    code = (
        "import sys, detection.family, data.coco, data.mixing, data.world, data.augment; "
        "assert 'prefect' not in sys.modules, 'prefect was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_families_do_not_import_each_other_and_nets_imports_neither():
    """Parts both families use live in nets/; a family never reaches into the other."""
    families = {"detection", "segmentation"}
    for pkg in [*families, "nets"]:
        others = families - {pkg}
        for path in (ROOT / pkg).rglob("*.py"):
            assert not imported_modules(path) & others, f"{path} imports {imported_modules(path) & others}"
