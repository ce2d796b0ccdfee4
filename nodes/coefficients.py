"""Coefficient choices of the nodes: one resolver from a choice to a coefficient source.

A choice is ``auto`` (the pack's default file for the model's family), a ``.safetensors`` file name
as ComfyUI lists it (the user's ``models/consistency_solver/`` and the pack's ``solver/bundled/``),
or a preset name. Files are read only through ``solver.load_coefficients``, cached by path and
modification time, so an overwritten file is re-read. Pure torch: ComfyUI's folder lookup is passed
in as ``locate``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..solver import (
    PRESET_NAMES,
    CoefficientSource,
    PolicyCoefficients,
    Preset,
    TableCoefficients,
    check_choice,
    load_coefficients,
    model_kind,
    read_metadata,
)
from ..solver.defaults import BUNDLED_DIR, default_file_name

FOLDER_NAME = "consistency_solver"  # models/consistency_solver/ in ComfyUI's folder_paths
AUTO = "auto"
STORED_MODE = "as stored in the file"
INFERENCE_MODE_CHOICES = (STORED_MODE, "mode", "expectation")
MODEL_KINDS = ("eps", "flow")
SCHEDULER_NAME = "consistency_solver"  # the learned schedule, as a node and in ComfyUI's scheduler lists
UNTRAINED_MARK = " (untrained)"  # how the dropdowns mark the presets, classic solvers that learned nothing

Locate = Callable[[str], str]


@dataclass(frozen=True)
class CoefficientSelection:
    """What a node's coefficient widgets chose; resolved against the model when sampling starts."""

    choice: str = AUTO
    mode: str = STORED_MODE
    allow_untrained_steps: bool = False

    def __post_init__(self) -> None:
        check_choice("inference mode", self.mode, INFERENCE_MODE_CHOICES)


class WrongModelFamily(ValueError):
    """A coefficient file made for one model family (``file_kind``) chosen for a model of the other (``kind``)."""

    def __init__(self, path: str | os.PathLike, file_kind: str, kind: str):
        self.path, self.file_kind, self.kind = os.fspath(path), file_kind, kind
        super().__init__(f"coefficient file {self.path!r} was made for {file_kind} models, not {kind} models")


class NoLearnedSchedule(ValueError):
    """The learned schedule was asked of coefficients that carry none."""

    def __init__(self) -> None:
        super().__init__("these coefficients carry no learned schedule")


def default_coefficient_path(kind: str) -> Path:
    """The bundled file used for a model family when nothing else is chosen (``auto``, KSampler by name)."""
    return BUNDLED_DIR / default_file_name(kind)


def coefficient_choices(file_names: list[str]) -> list[str]:
    """The combo list of every coefficient widget: auto, the listed files, then the presets marked untrained."""
    return [AUTO, *file_names, *(f"{preset}{UNTRAINED_MARK}" for preset in PRESET_NAMES)]


def choice_from_widget(value: str) -> str:
    """The choice a combo entry stands for. A preset's bare name, as workflows saved before the mark hold it,
    stands for that preset too."""
    bare = value.removesuffix(UNTRAINED_MARK)
    return bare if bare in PRESET_NAMES else value


def is_coefficient_choice(value: str, file_names: list[str]) -> bool:
    """Whether a widget value names a listed choice, the bare preset names included."""
    return value in coefficient_choices(file_names) or value in PRESET_NAMES


CALIBRATED_FAMILY = "calibrated"  # model_family "calibrated-eps" / "calibrated-flow": made by the Calibrate node


def calibrated_for(paths: Iterable[str], fingerprint: str, kind: str, steps: int | None = None) -> str | None:
    """The calibrated file ``auto`` uses for a model: among ``paths``, those the Calibrate node made for exactly this
    model (``fingerprint``, see ``fingerprint.model_fingerprint``) and family that hold ``steps`` (any count when
    None), the newest; None when there is none."""
    matches = []
    for path in paths:
        made_for = _calibration_of(path)
        if made_for is not None and made_for[:2] == (fingerprint, kind) and (steps is None or steps in made_for[2]):
            matches.append(path)
    return max(matches, key=lambda path: (os.stat(path).st_mtime_ns, path), default=None)


_calibrations: dict[tuple[str, str], tuple[str, str, tuple[int, ...]] | None] = {}


def _calibration_of(path: str) -> tuple[str, str, tuple[int, ...]] | None:
    """(model fingerprint, kind, step counts) of a calibrated file, or None for any other file; cached by path and
    modification time."""
    key = (path, _modified(path))
    if key not in _calibrations:
        metadata = read_metadata(path)
        family = metadata.get("model_family", "")
        made_for = None
        if family.startswith(f"{CALIBRATED_FAMILY}-"):
            try:
                fingerprint = json.loads(metadata.get("training", "{}")).get("model_fingerprint")
                steps = tuple(int(n) for n in metadata.get("trained_steps", "").split(",") if n)
            except ValueError:
                fingerprint = None
            if fingerprint:
                made_for = (fingerprint, model_kind(family), steps)
        _calibrations[key] = made_for
    return _calibrations[key]


def resolve_coefficients(
    selection: CoefficientSelection, kind: str, locate: Locate, calibrated: str | None = None
) -> CoefficientSource:
    """The coefficient source for a model of ``kind`` (``eps`` or ``flow``), refusing a file made for the other.
    ``auto`` is the ``calibrated`` file when there is one for the running model (``calibrated_for``), else the pack's
    default for the family.

    Raises CoefficientFileError (from ``locate`` or the loader) or WrongModelFamily.
    """
    if selection.choice in PRESET_NAMES:
        return Preset(selection.choice)
    if selection.choice == AUTO:
        path = Path(calibrated) if calibrated is not None else default_coefficient_path(kind)
    else:
        path = Path(locate(selection.choice))
    coefficients = _load_cached(os.fspath(path), selection.mode, selection.allow_untrained_steps)
    check_model_kind(coefficients.metadata["model_family"], kind, path)
    return coefficients


def check_model_kind(model_family: str, kind: str, path: str | os.PathLike) -> None:
    """Refuse an ``*-eps`` file for a flow model and a ``*-flow`` file for an EPS/V-prediction model."""
    file_kind = model_kind(model_family)
    if file_kind not in ("any", kind):
        raise WrongModelFamily(path, file_kind, kind)


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
    """How a message names a coefficient choice for a model of ``kind``."""
    if choice in PRESET_NAMES:
        return f"the preset '{choice}{UNTRAINED_MARK}'"  # as the dropdowns show it
    if choice == AUTO:
        return f"the pack's default coefficient file {default_file_name(kind)}"
    return f"the coefficient file '{choice}'"


def schedule_steps(steps: int, denoise: float) -> int:
    """How many steps the full schedule has, as BasicScheduler and KSampler count them: steps / denoise."""
    return steps if denoise >= 1.0 else int(steps / denoise)


def trained_step_counts(source: CoefficientSource) -> tuple[int, ...] | None:
    """The step counts a source runs: a table's own, a policy's trained ones (unless it allows others), or
    None for any count (presets, a policy allowed untrained counts)."""
    if isinstance(source, TableCoefficients):
        return tuple(sorted(source.tables))
    if isinstance(source, PolicyCoefficients) and not source.allow_untrained_steps:
        return tuple(sorted(source.trained_steps))
    return None


def runnable_steps(source: CoefficientSource, denoise: float, learned_schedule: bool, coefficients: bool) -> list[int]:
    """The step counts a node can set: trained for the coefficients (when ``coefficients`` sample the run) and,
    on the learned schedule, with ``steps / denoise`` a count the schedule was learned for."""
    counts = trained_step_counts(source) if coefficients else None
    if learned_schedule:
        schedule = sorted(source.schedule.positions) if source.schedule is not None else []
        candidates = range(1, max(schedule, default=0) + 1) if counts is None else counts
        return [n for n in candidates if schedule_steps(n, denoise) in schedule]
    return list(counts or [])


def learned_sigmas(
    source: CoefficientSource, steps: int, denoise: float, sigma_min: float, sigma_max: float
) -> torch.Tensor:
    """The SIGMAS of a source's learned schedule for a model spanning [sigma_min, sigma_max] (float32, CPU).

    ``denoise`` < 1 works as in BasicScheduler: the schedule of ``int(steps / denoise)`` steps, of which the
    last ``steps + 1`` sigmas are kept, so that total must be a trained step count (UntrainedStepCount
    otherwise). ``denoise`` <= 0 gives no sigmas (no steps), as in BasicScheduler. NoLearnedSchedule when the
    source has none.
    """
    if denoise <= 0.0:
        return torch.zeros(0)
    if source.schedule is None:
        raise NoLearnedSchedule()
    sigmas = source.schedule.sigmas(schedule_steps(steps, denoise), float(sigma_min), float(sigma_max))
    return sigmas[-(steps + 1) :].to(torch.float32)
