"""The package's floor plan, checked: each layer imports only from the layers below it, attacks/
knows nothing of robust, and the only imports inside functions are optional dependencies."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("timm", "torch.utils.tensorboard")  # extras: imported where used, so the package works without them
# Lower numbers are lower layers; errors (and version, which imports nothing) sits under the rest of layer 0, which raises its errors; run (the names
# and readers of a run folder's files) on errors alone, so outputs, checkpoint and every reader above can use it; and
# plain_model (models from outside robust) on checkpoint, whose format it refuses to misread; precision
# (auto by measurement) above runtime and outputs, whose flags it reads and whose writer caches it; plan (a
# run's resolved settings) on config, whose fields it resolves.
# Layer 7 holds the features on top of training, one room each; stats (means, t intervals) and curves
# (learning-curve and eps-sweep figures, the run folders they read) sit under the rooms that share them.
LAYERS = {
    "robust.attacks": 0, "robust.version": 1, "robust.errors": 1, "robust.run": 1.5, "robust.torchrun": 2, "robust.runtime": 2, "robust.progress": 2, "robust.threat": 2, "robust.checks": 2, "robust.recipes": 2,
    "robust.outputs": 2, "robust.precision": 2.5, "robust.nn": 3, "robust.data": 3, "robust.checkpoint": 4, "robust.plain_model": 4.5, "robust.objectives": 4,
    "robust.eval": 4, "robust.config": 5, "robust.plan": 5.5, "robust.train": 6,
    "robust.stats": 7, "robust.curves": 7, "robust.export": 7, "robust.pseudo_label": 7, "robust.bench": 7,
    "robust.report": 7.5, "robust.compare": 7.5, "robust.analysis": 7.5, "robust.cli": 8, "robust": 9,
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


def layer_plan() -> dict[str, float]:
    """The layer plan of robust/__init__.py's docstring: room -> its number ("7.5. ``compare``, ...")."""
    plan: dict[str, float] = {}
    number = None
    for line in ast.get_docstring(ast.parse((ROOT / "robust" / "__init__.py").read_text())).splitlines():
        item = re.match(r"(\d+(?:\.\d+)?)\. ", line)
        if item:
            number = float(item.group(1))
        elif not line.startswith("   "):
            number = None  # the list (and an item's continuation lines) ended
        for name in re.findall(r"``(\w+)``", line) if number is not None else ():
            if f"robust.{name}" in LAYERS:
                plan.setdefault(f"robust.{name}", number)  # a room is listed where first named
    return plan


def test_the_docstring_states_the_layer_plan_checked_here():
    assert layer_plan() == {room: n for room, n in LAYERS.items() if room != "robust"}
