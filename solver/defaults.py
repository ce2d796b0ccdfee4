"""Where the pack's bundled coefficient files live, and how the per-family defaults are made.

One place for nodes (``auto`` and KSampler by name), the benchmark and the demo; the commands are the
ones recorded in the files' metadata and in README.
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
    "eps": f"{_TRAIN} --bed fashion-eps-cfg --bed gmm-image-eps-cfg --updates 200 --batch 4 --lr 5e-3 "
    "--train-count 128 --held-out-count 64 --output solver/bundled/default-eps.safetensors",
    "flow": f"{_TRAIN} --bed gmm-image-flow-cfg --bed gmm-image-flow --bed gmm-vector-flow-cfg --bed gmm-vector-flow "
    "--updates 1000 --batch 16 --lr 1e-2 --output solver/bundled/default-flow.safetensors",
}


def default_file_name(kind: str) -> str:
    """``default-eps.safetensors`` or ``default-flow.safetensors``: the default for a model family."""
    check_choice("model kind", kind, tuple(DEFAULT_FILE_COMMANDS))
    return f"default-{kind}.safetensors"
