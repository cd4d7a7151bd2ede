"""Imports point one way: flows -> tasks -> engine -> families -> nets, data (docs/design.md, Layers)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Prefect-free folders, with the layers above each that it must never import.
PREFECT_FREE = {
    "engine": {"flows", "tasks"},
    "detection": {"flows", "tasks", "engine"},
    "segmentation": {"flows", "tasks", "engine"},
    "nets": {"flows", "tasks", "engine", "detection", "segmentation"},
    "data": {"flows", "tasks", "engine", "detection", "segmentation", "nets"},
    "configs": {"flows", "tasks", "engine", "detection", "segmentation", "nets", "data"},
}


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
    for pkg, above in PREFECT_FREE.items():
        paths = list((ROOT / pkg).rglob("*.py"))
        assert paths, f"{pkg}/ holds no Python file"
        for path in paths:
            mods = imported_modules(path)
            assert "prefect" not in mods and "prefect_dask" not in mods, path
            assert not mods & above, f"{path} imports a layer above it: {mods & above}"


def test_tasks_hold_prefect_tasks_only():
    """tasks/ is the Prefect tasks and their runners; the machinery they wrap is engine/."""
    assert sorted(p.name for p in (ROOT / "tasks").glob("*.py")) == ["__init__.py", "runners.py", "units.py"]


def test_tasks_do_not_import_flows():
    for path in (ROOT / "tasks").rglob("*.py"):
        assert "flows" not in imported_modules(path), path


def test_families_import_without_prefect():
    code = (
        "import sys, detection.family, segmentation.family, engine.training, engine.labeling, engine.launcher, "
        "data.coco, data.mixing, data.world, data.augment; "
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


def project_module_imports() -> dict[str, set[str]]:
    """Every project module's imports of other project modules, at any depth of the file
    (imports inside functions count: they are circles too, only deferred)."""
    packages = ["flows", "tasks", "engine", "nets", "detection", "segmentation", "data", "configs"]
    modules = {}
    for pkg in packages:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules:
                    deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        graph[name] = deps - {name}
    return graph


def test_no_import_circle():
    graph = project_module_imports()
    assert {"data.files", "data.storage", "engine.loop"} <= set(graph), "the module graph missed modules"
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circle = path[path.index(dep) :] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
