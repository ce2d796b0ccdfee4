"""Where the pack's bundled coefficient files live, and how the per-family defaults are made.

One place for nodes (``auto`` and KSampler by name), the benchmark and the demo; the commands are README's (the
eps one runs the leave-one-bed-out protocol, whose last run is the command recorded in the file's metadata).
"""

from __future__ import annotations

from pathlib import Path

from .errors import check_choice

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
_TRAIN = (
    "python -m consistency_solver.training --steps 4-12 --threads 1 --no-progress --mode direct --schedule learned "
    "--lr-schedule cosine"
)
DEFAULT_FILE_COMMANDS = {
    # the leave-one-bed-out protocol, whose last run trains the default on every EPS/V bed
    "eps": "python -m consistency_solver.training.trainer.leave_one_out --family eps",
    "flow": f"{_TRAIN} --bed gmm-image-flow-cfg --bed gmm-image-flow --bed gmm-vector-flow-cfg --bed gmm-vector-flow "
    "--updates 1000 --batch 16 --lr 1e-2 --output solver/bundled/default-flow.safetensors",
}


def default_file_name(kind: str) -> str:
    """``default-eps.safetensors`` or ``default-flow.safetensors``: the default for a model family."""
    check_choice("model kind", kind, tuple(DEFAULT_FILE_COMMANDS))
    return f"default-{kind}.safetensors"
