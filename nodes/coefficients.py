"""Coefficient choices of the nodes: one resolver from a choice to a coefficient source.

A choice is ``auto`` (the pack's default file for the model's family), a ``.safetensors`` file name
as ComfyUI lists it (the user's ``models/consistency_solver/`` and the pack's ``solver/bundled/``),
or a preset name. Files are read only through ``solver.load_coefficients``, cached by path and
modification time, so an overwritten file is re-read. Pure torch: ComfyUI's folder lookup is passed
in as ``locate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..solver import PRESET_NAMES, CoefficientSource, Preset, load_coefficients, model_kind
from ..solver.defaults import BUNDLED_DIR, DEFAULT_FILE_COMMANDS, default_file_name

FOLDER_NAME = "consistency_solver"  # models/consistency_solver/ in ComfyUI's folder_paths
AUTO = "auto"
STORED_MODE = "as stored in the file"
INFERENCE_MODE_CHOICES = (STORED_MODE, "mode", "expectation")
MODEL_KINDS = ("eps", "flow")

Locate = Callable[[str], str]


@dataclass(frozen=True)
class CoefficientSelection:
    """What a node's coefficient widgets chose; resolved against the model when sampling starts."""

    choice: str = AUTO
    mode: str = STORED_MODE
    allow_untrained_steps: bool = False

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODE_CHOICES:
            raise ValueError(f"unknown inference mode {self.mode!r}; choose one of {', '.join(INFERENCE_MODE_CHOICES)}")


def default_coefficient_path(kind: str) -> Path:
    """The bundled file used for a model family when nothing else is chosen (``auto``, KSampler by name)."""
    return BUNDLED_DIR / default_file_name(kind)


def coefficient_choices(file_names: list[str]) -> list[str]:
    """The combo list of every coefficient widget: auto, the listed files, then the presets."""
    return [AUTO, *file_names, *PRESET_NAMES]


def resolve_coefficients(selection: CoefficientSelection, kind: str, locate: Locate) -> CoefficientSource:
    """The coefficient source for a model of ``kind`` (``eps`` or ``flow``), refusing a file made for the other."""
    if selection.choice in PRESET_NAMES:
        return Preset(selection.choice)
    if selection.choice == AUTO:
        path = default_coefficient_path(kind)
        if not path.is_file():
            raise FileNotFoundError(
                f"the pack's default coefficients for {kind} models, {path}, are missing. Fix: create them with "
                f"`{DEFAULT_FILE_COMMANDS[kind]}`, or pick a coefficient file or a preset in the "
                "SamplerConsistencySolver / Consistency Solver Coefficients node instead of 'auto'"
            )
    else:
        path = Path(locate(selection.choice))
    coefficients = _load_cached(os.fspath(path), selection.mode, selection.allow_untrained_steps)
    check_model_kind(coefficients.metadata["model_family"], kind, path)
    return coefficients


def check_model_kind(model_family: str, kind: str, path: str | os.PathLike) -> None:
    """Refuse an ``*-eps`` file for a flow model and a ``*-flow`` file for an EPS/V-prediction model."""
    file_kind = model_kind(model_family)
    if file_kind not in ("any", kind):
        raise ValueError(
            f"coefficient file {os.fspath(path)!r} was made for {file_kind} models (model_family "
            f"{model_family!r}), but this model is a {kind} model. Fix: choose a file made for {kind} models "
            f"(or 'any'), 'auto', or a preset"
        )


_cache: dict[tuple, CoefficientSource] = {}


def _load_cached(path: str, mode: str, allow_untrained_steps: bool) -> CoefficientSource:
    key = (path, _modified(path), mode, allow_untrained_steps)
    if key not in _cache:
        # Forget older versions of this file; a missing file gets load_coefficients' own error, naming the fix.
        for stale in [k for k in _cache if k[0] == path]:
            del _cache[stale]
        _cache[key] = load_coefficients(
            path, mode=None if mode == STORED_MODE else mode, allow_untrained_steps=allow_untrained_steps
        )
    return _cache[key]


def _modified(path: str) -> str:
    if not os.path.isfile(path):
        return "missing"
    stat = os.stat(path)
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def file_fingerprint(choice: str, locate: Locate) -> str:
    """Changes whenever the file(s) behind a choice change on disk, so ComfyUI re-runs the nodes reading them."""
    if choice in PRESET_NAMES:
        return choice
    paths = [os.fspath(default_coefficient_path(kind)) for kind in MODEL_KINDS] if choice == AUTO else [locate(choice)]
    return ";".join(f"{path}:{_modified(path)}" for path in paths)
