"""Where the pack's bundled coefficient files live, and how the per-family defaults are made.

One place for nodes (``auto`` and KSampler by name), the benchmark and the demo; the commands are those of
docs/training.md (the leave-one-bed-out protocol, whose last run is the command recorded in the file's metadata).
"""

from __future__ import annotations

from pathlib import Path

from .errors import check_choice

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DEFAULT_FILE_COMMANDS = {
    # the leave-one-bed-out protocol, whose last run trains the default on every bed of the family
    "eps": "python -m consistency_solver.training.trainer.leave_one_out --family eps",
    "flow": "python -m consistency_solver.training.trainer.leave_one_out --family flow",
}


def default_file_name(kind: str) -> str:
    """``default-eps.safetensors`` or ``default-flow.safetensors``: the default for a model family."""
    check_choice("model kind", kind, tuple(DEFAULT_FILE_COMMANDS))
    return f"default-{kind}.safetensors"
