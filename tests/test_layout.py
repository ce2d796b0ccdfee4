"""The pack's rooms import one way, with no cycles, lazy imports included (CONTRIBUTING.md, Layout)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Importer room -> the rooms it may import. ``a`` <- ``b`` in CONTRIBUTING.md's words is ``b: {a}`` here.
ALLOWED = {
    "": {"nodes", "solver"},  # the root __init__.py, ComfyUI's entry
    "solver": set(),
    "nodes": {"solver", "training.calibration"},
    "training": {"training.trainer"},  # __main__.py, the trainer's entry
    "training.calibration": {"solver"},
    "training.testbeds": {"solver"},
    "training.evaluation": {"solver", "training.calibration", "training.testbeds"},
    "training.trainer": {"solver", "training.calibration", "training.evaluation", "training.testbeds"},
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
    return imported


def test_every_import_between_rooms_goes_the_allowed_way():
    sources = [p for p in ROOT.rglob("*.py") if p.parts[len(ROOT.parts)] not in ("tests", ".venv", ".comfyui")]
    assert len(sources) > 30
    wrong = []
    for path in sources:
        own = room(list(path.relative_to(ROOT).parent.parts))
        for target in relative_imports(path) - {own}:
            if target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong
