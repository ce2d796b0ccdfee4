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

import torch

from ..solver import PRESET_NAMES, CoefficientSource, Preset, load_coefficients, model_kind
from ..solver.defaults import BUNDLED_DIR, DEFAULT_FILE_COMMANDS, default_file_name

FOLDER_NAME = "consistency_solver"  # models/consistency_solver/ in ComfyUI's folder_paths
AUTO = "auto"
STORED_MODE = "as stored in the file"
INFERENCE_MODE_CHOICES = (STORED_MODE, "mode", "expectation")
MODEL_KINDS = ("eps", "flow")
SCHEDULER_NAME = "consistency_solver"  # the learned schedule, as a node and in ComfyUI's scheduler lists
TRAIN_SCHEDULE_COMMAND = "python -m consistency_solver.training --mode direct --schedule learned"

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


def describe_choice(choice: str, kind: str) -> str:
    """How an error message names a coefficient choice for a model of ``kind``."""
    if choice in PRESET_NAMES:
        return f"the preset {choice!r}"
    if choice == AUTO:
        return f"the pack's default coefficients for {kind} models ({default_file_name(kind)})"
    return f"coefficient file {choice!r}"


def schedule_steps(steps: int, denoise: float) -> int:
    """How many steps the full schedule has, as BasicScheduler and KSampler count them: steps / denoise."""
    return steps if denoise >= 1.0 else int(steps / denoise)


def learned_sigmas(
    source: CoefficientSource,
    steps: int,
    denoise: float,
    sigma_min: float,
    sigma_max: float,
    described_as: str,
    steps_note: str = "",
    by_name: bool = False,
) -> torch.Tensor:
    """The SIGMAS of a source's learned schedule for a model spanning [sigma_min, sigma_max] (float32, CPU).

    ``denoise`` < 1 works as in BasicScheduler: the schedule of ``int(steps / denoise)`` steps, of which the
    last ``steps + 1`` sigmas are kept, so that total must be a trained step count. ``denoise`` <= 0 gives
    no sigmas (no steps), as in BasicScheduler. ``described_as`` names the source in errors, ``steps_note``
    says how the caller counted the steps, ``by_name`` that it came from a scheduler list (no file choice).
    """
    if denoise <= 0.0:
        return torch.zeros(0)
    other_schedulers = "or use another scheduler (simple, karras, ...) with the consistency_solver sampler"
    if source.schedule is None:
        where = (
            "by name only the default file is read: use the Consistency Solver Scheduler node with"
            if by_name
            else "choose"
        )
        raise ValueError(
            f"the {SCHEDULER_NAME} scheduler reads the schedule learned with the coefficients, but there is "
            f"none in {described_as}. Fix: {where} a coefficient file trained with a schedule "
            f"(`{TRAIN_SCHEDULE_COMMAND}`), {other_schedulers}"
        )
    total = schedule_steps(steps, denoise)
    trained = sorted(source.schedule.positions)
    if total not in trained:
        asked = f"{total} steps" if total == steps else f"{total} steps ({steps} steps at denoise {denoise:g})"
        raise ValueError(
            f"the learned schedule of {described_as} covers {_step_counts(trained)} steps, not {asked}{steps_note}. "
            f"Fix: pick a trained step count, train a schedule for {total} steps (`{TRAIN_SCHEDULE_COMMAND} "
            f"--steps ...`), {other_schedulers}"
        )
    sigmas = source.schedule.sigmas(total, float(sigma_min), float(sigma_max))
    return sigmas[-(steps + 1) :].to(torch.float32)


def _step_counts(counts: list[int]) -> str:
    """``4, 5, 6, 8`` or, for a run without gaps, ``4-12``."""
    if len(counts) > 2 and counts == list(range(counts[0], counts[-1] + 1)):
        return f"{counts[0]}-{counts[-1]}"
    return ", ".join(str(n) for n in counts)
