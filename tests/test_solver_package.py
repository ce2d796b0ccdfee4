"""Packaging rules: the pack imports without ComfyUI, and nothing pins or pulls a torch build."""

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_package_and_solver_never_imports_comfy():
    code = (
        "import sys, consistency_solver, consistency_solver.solver;"
        "print(any(m.split('.')[0] == 'comfy' for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_solver_is_pure_torch():
    for source in (ROOT / "solver").glob("*.py"):
        text = source.read_text()
        assert "import comfy" not in text and "from comfy" not in text, source
        assert "training" not in [
            line.split()[1].lstrip(".").split(".")[0] for line in text.splitlines() if line.startswith("from .")
        ], source


def test_dependencies_never_pin_torch_and_requirements_leave_torch_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch" in project["dependencies"], "torch must be a plain, unpinned dependency"
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [
        line
        for line in requirements
        if line.split("=")[0].split(">")[0].split("<")[0] in ("torch", "numpy", "torchvision")
    ]
    assert project["name"].lower().find("comfyui") == -1 and project["requires-python"] == ">=3.10"


def test_every_package_of_the_tree_is_in_the_distribution():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(["consistency_solver", *init.parent.relative_to(ROOT).parts])
        for init in ROOT.rglob("__init__.py")
        if init.relative_to(ROOT).parts[0] not in ("tests", ".venv", ".comfyui")
    }
    assert on_disk == packages
