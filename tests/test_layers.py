"""The package's floor plan, checked: each layer imports only from the layers below it, attacks/
knows nothing of robust, and the only imports inside functions are optional dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("timm", "torch.utils.tensorboard")  # extras: imported where used, so the package works without them
# Lower numbers are lower layers; errors sits under the rest of layer 0, which raises its errors, and
# plain_model (models from outside robust) on checkpoint, whose format it refuses to misread; precision
# (auto by measurement) above runtime and outputs, whose flags it reads and whose writer caches it; plan (a
# run's resolved settings) on config, whose fields it resolves.
LAYERS = {
    "robust.attacks": 0, "robust.errors": 1, "robust.runtime": 2, "robust.progress": 2, "robust.threat": 2, "robust.checks": 2, "robust.recipes": 2,
    "robust.outputs": 2, "robust.precision": 2.5, "robust.nn": 3, "robust.data": 3, "robust.checkpoint": 4, "robust.plain_model": 4.5, "robust.objectives": 4,
    "robust.eval": 4, "robust.config": 5, "robust.plan": 5.5, "robust.train": 6, "robust.lab": 7, "robust.cli": 8, "robust": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("attacks", "cli"):
        parts = ["robust", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The layer entry a module belongs to (the longest matching prefix)."""
    return max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)


def sources() -> list[Path]:
    return sorted([*(ROOT / "robust").rglob("*.py"), *(ROOT / "attacks").glob("*.py"), *(ROOT / "cli").glob("*.py")])


def test_every_import_goes_down_a_layer():
    wrong = []
    for path in sources():
        me = module_name(path)
        if me == "robust":
            continue  # the package's front door re-exports the public API
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and room(me) != "robust.attacks":
                wrong.append(f"{me}: relative import {ast.unparse(node)}")  # attacks/ alone: it stands on its own
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "robust":
                target = node.module if node.module != "robust" else f"robust.{node.names[0].name}"
                if room(target) == room(me):
                    continue  # inside one room (a subpackage's own modules)
                if LAYERS[room(target)] >= LAYERS[room(me)]:
                    wrong.append(f"{me} imports {target}")
    assert wrong == []


def test_attacks_know_nothing_of_robust():
    for path in (ROOT / "attacks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.level or not node.module.startswith("robust"), (path.name, node.module)


def test_only_optional_dependencies_are_imported_inside_functions():
    inside = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if not any(name == o or name.startswith(o + ".") for o in OPTIONAL):
                    inside.append(f"{module_name(path)}: {ast.unparse(node)}")
    assert inside == []
