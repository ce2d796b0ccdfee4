"""The pack's rooms import one way, with no cycles, lazy imports included: the runtime that ComfyUI loads (the
root ``__init__.py``, ``nodes/``, ``solver/``, the calibrator's ``calibration/``) never imports the lab
(``training/``)."""

import ast
from graphlib import TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("", "nodes", "solver", "calibration")
# Importer room -> the rooms it may import.
ALLOWED = {
    "": {"nodes", "solver"},  # the root __init__.py, ComfyUI's entry
    "solver": set(),
    "calibration": {"solver"},
    "nodes": {"solver", "calibration"},
    "training": {"training.trainer"},  # __main__.py, the trainer's entry
    "training.testbeds": {"solver"},
    "training.evaluation": {"solver", "calibration", "nodes", "training.testbeds"},
    "training.trainer": {"solver", "calibration", "training.evaluation", "training.testbeds"},
}


def room(parts: list[str]) -> str:
    return ".".join(parts[:2]) if parts[:1] == ["training"] and len(parts) > 1 else ".".join(parts[:1])


def relative_imports(path: Path) -> set[str]:
    """The rooms a module imports (every ``from .x import y``, at any depth of the module)."""
    package = list(path.relative_to(ROOT).parent.parts)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            imported.add(room(base + (node.module.split(".") if node.module else [])))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            imported |= {room(name.split(".")[1:]) for name in names if name.startswith("consistency_solver.")}
    return imported


def sources() -> list[Path]:
    found = [p for p in ROOT.rglob("*.py") if p.parts[len(ROOT.parts)] not in ("tests", ".venv", ".comfyui")]
    assert len(found) > 30
    return found


def test_every_import_between_rooms_goes_the_allowed_way():
    wrong = []
    for path in sources():
        own = room(list(path.relative_to(ROOT).parent.parts))
        for target in relative_imports(path) - {own}:
            if target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong


def test_the_runtime_imports_nothing_of_the_lab():
    runtime = [p for p in sources() if room(list(p.relative_to(ROOT).parent.parts)) in RUNTIME]
    assert {room(list(p.relative_to(ROOT).parent.parts)) for p in runtime} == set(RUNTIME)
    lab = [f"{p.relative_to(ROOT)}" for p in runtime if any(r.startswith("training") for r in relative_imports(p))]
    assert not lab
    assert not any(target.startswith("training") for room_name in RUNTIME for target in ALLOWED[room_name])


def test_the_rooms_form_no_cycle():
    order = list(TopologicalSorter(ALLOWED).static_order())  # raises CycleError on a cycle
    assert set(order) >= set(ALLOWED)
