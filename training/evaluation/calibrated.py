"""Calibrating on a test bed (or the trainer's ComfyUI model) and judging the result on held-out noises.

The target is the benchmark's reference: the 40-step multistep run (``references.multistep_run``) from the
calibration noises, recorded with its trajectory, and its model calls count toward the budget. Calibration noises
are training seeds (below 10_000), the held-out comparison uses held-out seeds, and compares the calibrated file
with every stock ComfyUI sampler when ComfyUI imports (else the project's dpmpp_2m, labelled so) and the presets.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ...solver import PRESET_NAMES, CoefficientSource, Preset
from ..calibration import Calibration, TargetRun, calibrate, check_budget
from ..testbeds import run_sigmas
from .evaluator import preview_rmse, solver_sampler
from .references import (
    held_out_seeds,
    multistep_run,
    reference_cache_dir,
    reference_finals,
    seeded_batch,
    training_seeds,
)
from .stock_samplers import is_stock_label, stock_comparison

REFERENCE_STEPS = 40  # the benchmark's reference final
CALIBRATED = "calibrated"


def calibration_noises(budget: int, steps: tuple[int, ...], reference_steps: int = REFERENCE_STEPS) -> int:
    """As many calibration noises as the budget pays for: a reference run and one rollout of every step count each
    (the default calibration has no Gauss-Newton rounds)."""
    return max(1, budget // (reference_steps + sum(n - 1 for n in steps)))


def reference_target(bed: Any, noises: Tensor, labels: Tensor | None, steps: int = REFERENCE_STEPS) -> TargetRun:
    """The reference run from ``noises`` as a calibration target: states and denoised at each of its sigmas."""
    states, denoised, sigmas = [], [], []

    def record(info: dict[str, Any]) -> None:
        states.append(info["x"].detach().cpu())
        denoised.append(info["denoised"].detach().cpu())
        sigmas.append(float(info["sigma"]))

    with torch.no_grad():
        finals = multistep_run(bed, noises, labels, steps, callback=record)
    return TargetRun(
        sigmas=torch.tensor(sigmas, dtype=torch.float64),
        states=torch.stack(states),
        denoised=torch.stack(denoised),
        finals=finals.detach().cpu(),
        model_calls=len(noises) * steps,
    )


def calibrate_bed(
    bed: Any,
    steps: tuple[int, ...],
    budget: int,
    noises: int,
    reference_steps: int = REFERENCE_STEPS,
    end_to_end: bool = False,
    jacobian_noises: int | None = None,
) -> Calibration:
    """Calibrate ``steps`` for ``bed`` on ``noises`` training seeds against its reference finals, within ``budget``
    model calls (the reference runs included; refused before any call when too small)."""
    check_budget(budget, noises * reference_steps, noises, steps)
    started = time.perf_counter()
    noise, labels = seeded_batch(bed, training_seeds(noises))
    target = reference_target(bed, noise, labels, reference_steps)

    def denoiser(x: Tensor, sigma: Tensor, samples: Tensor) -> Tensor:
        return bed.denoise(x, sigma, None if labels is None else labels[samples])

    calibration = calibrate(
        denoiser,
        target,
        steps,
        budget,
        sigma_min=bed.sigma_min,
        sigma_max=bed.sigma_max,
        end_to_end=end_to_end,
        jacobian_noises=jacobian_noises,
    )
    calibration.seconds = time.perf_counter() - started  # the reference runs included
    return calibration


def held_out_comparison(
    bed: Any, sources: dict[str, CoefficientSource], steps: tuple[int, ...], count: int
) -> dict[str, dict[int, float]]:
    """{row: {steps: held-out RMSE}} for the given coefficient sources (each on its own schedule), every stock
    sampler on the bed's schedule and the presets, on ``count`` held-out noises."""
    noise, labels = seeded_batch(bed, held_out_seeds(count))
    finals = reference_finals(
        bed, noise, labels, method="multistep", steps=REFERENCE_STEPS, cache_dir=reference_cache_dir()
    )
    rows = {}
    for label, source in {**sources, **{f"preset {name}": Preset(name) for name in PRESET_NAMES}}.items():
        rows[label] = {
            n: preview_rmse(bed, solver_sampler(source), run_sigmas(bed, n, source.schedule).float(), noise, labels,
                            finals)
            for n in steps
        }  # fmt: skip
    for label, (sampler, schedule) in stock_comparison(bed.sigmas).items():
        rows[label] = {n: preview_rmse(bed, sampler, schedule(n).float(), noise, labels, finals) for n in steps}
    return rows


def stock_rows(rows: dict[str, dict[int, float]]) -> list[str]:
    """The rows of ``held_out_comparison`` that are stock samplers (ComfyUI's, or the project's dpmpp_2m)."""
    return [label for label in rows if is_stock_label(label)]


def ratios_to_best_stock(rows: dict[str, dict[int, float]], label: str = CALIBRATED) -> dict[int, dict[str, Any]]:
    """Per step count, ``label``'s RMSE over the best stock sampler's, and which one that was."""
    result = {}
    for n, value in rows[label].items():
        best = min(stock_rows(rows), key=lambda row: rows[row][n])
        result[n] = {"ratio": value / rows[best][n], "best_stock": best, "best_stock_rmse": rows[best][n]}
    return result
