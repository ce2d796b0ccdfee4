"""Calibrating on a test bed (or the trainer's ComfyUI model) as the Calibrate node does, and judging the result.

The runtime's calibrator does the work (``calibration``); here a bed stands in for ComfyUI's guided model. The
refine the previews are fitted to is the node's default (ComfyUI's dpmpp_2m, ``simple``, 30 steps) when ComfyUI
imports, else the benchmark's 40-step reference; the guard races the fit against the bundled default on its learned
schedule and ComfyUI's stock linear samplers on the family's schedulers (without ComfyUI, the project's dpmpp_2m on
the bed's schedule). Calibration noises are training seeds (below 10_000); the judge uses held-out seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ...calibration import (
    DEFAULT,
    Calibration,
    Candidate,
    calibrate,
    plan_noises,
    probe_sampler,
    record_run,
    source_candidate,
    stock_candidate,
)
from ...calibration.calibrator import CANDIDATE_SAMPLERS, CANDIDATE_SCHEDULERS
from ...solver import CoefficientSource, load_coefficients
from ...solver.defaults import BUNDLED_DIR, default_file_name
from ..testbeds import run_sigmas
from .evaluator import preview_rmse, sample_previews, solver_sampler
from .references import reference_sampler, seeded_batch, training_seeds
from .stock_samplers import STOCK_SAMPLERS, comfy_unavailable_reason, dpmpp_2m, import_comfy, stock_sampler

REFERENCE_STEPS = 40  # the benchmark's reference final, the refine without ComfyUI
NODE_REFINE = ("dpmpp_2m", "simple", 30)  # the Calibrate node's default refine: sampler, scheduler, steps
CALIBRATED = "calibrated"
STOCK_PREFIX = "stock "  # how judge() marks the stock rows
Sampler = Callable[..., Tensor]


@dataclass(frozen=True)
class Refine:
    """The run previews are fitted to and judged against: a sampler on its sigmas, and how results name it."""

    sampler: Sampler
    sigmas: Tensor
    label: str


def comfy_model_sampling(bed: Any) -> Any:
    """ComfyUI's model_sampling of a bed's model space (for its schedulers): the model's own for the trainer's ComfyUI
    model; for a test bed, discrete flow at shift 3 for the flow kind, SD1.x's discrete EPS schedule (the eps beds'
    sigma range) for the eps kind."""
    if getattr(bed, "model_sampling", None) is not None:
        return bed.model_sampling
    import_comfy()
    import comfy.model_sampling as sampling

    class Settings:
        sampling_settings = {"shift": 3.0, "multiplier": 1000} if bed.kind == "flow" else {}

    if bed.kind == "flow":

        class FlowSampling(sampling.ModelSamplingDiscreteFlow, sampling.CONST):
            pass

        return FlowSampling(Settings())

    class DiscreteSampling(sampling.ModelSamplingDiscrete, sampling.EPS):
        pass

    return DiscreteSampling(Settings())


def ksampler_sigmas(bed: Any, sampler: str, scheduler: str, steps: int) -> Tensor:
    """The sigmas ComfyUI's KSampler gives ``sampler`` for ``steps`` steps of ``scheduler`` on ``bed`` (the
    penultimate one dropped for uni_pc, dpm_2, ...), float64."""
    import_comfy()
    import comfy.samplers

    model_sampling = comfy_model_sampling(bed)
    if sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]]).double()
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).double()


def default_refine(bed: Any) -> Refine:
    """The Calibrate node's default refine on ``bed`` when ComfyUI imports, else the 40-step reference."""
    if comfy_unavailable_reason() is None:
        sampler, scheduler, steps = NODE_REFINE
        return Refine(stock_sampler(sampler), ksampler_sigmas(bed, *NODE_REFINE), f"{sampler}/{scheduler}/{steps}")
    return Refine(reference_sampler, bed.sigmas(REFERENCE_STEPS), f"the {REFERENCE_STEPS}-step reference")


def default_candidate(bed: Any, steps: Sequence[int]) -> Candidate:
    """The bundled default of the bed's family on its learned schedule, as the guard races it."""
    default = load_coefficients(BUNDLED_DIR / default_file_name(bed.kind))
    sigmas = partial(default.schedule.sigmas, sigma_min=bed.sigma_min, sigma_max=bed.sigma_max)
    label = f"default ({default_file_name(bed.kind)})"
    return source_candidate(label, DEFAULT, default, sigmas, steps, schedule="learned")


def stock_candidates(bed: Any, samplers: Sequence[str], steps: Sequence[int]) -> list[Candidate]:
    """Stock samplers on the family's schedulers, as KSampler runs them (ComfyUI's), or without ComfyUI the project's
    dpmpp_2m on the bed's own schedule."""
    if comfy_unavailable_reason() is not None:
        sampler, label = dpmpp_2m()
        return [stock_candidate(label, sampler, bed.sigmas, steps, "the bed's")]
    return [
        stock_candidate(
            f"{name} / {scheduler}",
            stock_sampler(name),
            partial(ksampler_sigmas, bed, name, scheduler),
            steps,
            scheduler,
        )
        for scheduler in CANDIDATE_SCHEDULERS[bed.kind]
        for name in samplers
    ]


def prompt_labels(bed: Any, count: int, classes: Sequence[int] | None, seeds: Sequence[int]) -> Tensor | None:
    """The class of each calibration noise: noise j on ``classes[j mod len]`` (the node spreads its noises over its
    prompts so), or the seeds' own labels when ``classes`` is None."""
    if classes is None:
        return seeded_batch(bed, seeds)[1]
    return torch.tensor([classes[j % len(classes)] for j in range(count)])


def calibrate_bed(
    bed: Any,
    steps: Sequence[int],
    budget: int,
    classes: Sequence[int] | None = None,
    refine: Refine | None = None,
) -> Calibration:
    """Calibrate ``steps`` for ``bed`` within ``budget`` model calls, as the node does: probe the refine, plan the
    noises, record the refine from training seeds (on ``classes``, the bed's prompts), fit and validate."""
    started = time.perf_counter()
    refine = refine or default_refine(bed)
    sigmas = refine.sigmas.float()
    candidates = [default_candidate(bed, steps), *stock_candidates(bed, CANDIDATE_SAMPLERS, steps)]
    probe = probe_sampler(refine.sampler, None, torch.zeros(1, *bed.shape), sigmas)
    plan = plan_noises(budget, probe.calls, steps, candidates, sigmas[sigmas > 0])
    seeds = training_seeds(plan.noises)
    noise, _ = seeded_batch(bed, seeds)
    labels = prompt_labels(bed, plan.noises, classes, seeds)
    target = record_run(refine.sampler, bed.model(labels), bed.initial_state(noise, sigmas), sigmas)

    def denoiser(x: Tensor, sigma: Tensor, samples: Tensor) -> Tensor:
        return bed.denoise(x, sigma, None if labels is None else labels[samples])

    calibration = calibrate(denoiser, target, plan, steps, candidates, sigma_min=bed.sigma_min,
                            sigma_max=bed.sigma_max)  # fmt: skip
    return replace(calibration, seconds=time.perf_counter() - started)  # the refine included


def judge(
    bed: Any,
    refine: Refine,
    sources: dict[str, CoefficientSource],
    noise: Tensor,
    labels: Tensor | None,
    steps: Sequence[int],
    stock: bool = True,
) -> dict[str, dict[int, float]]:
    """{row: {steps: RMSE to the refine of the same noise}}: each coefficient source on its learned schedule (the
    bed's schedule without one), and with ``stock`` every stock sampler on the family's schedulers as KSampler runs
    them (without ComfyUI, the project's dpmpp_2m on the bed's schedule). Stock rows are those ``stock_rows``
    names."""
    finals = sample_previews(bed, refine.sampler, refine.sigmas.float(), noise, labels)
    runs: dict[str, tuple[Sampler, Callable[[int], Tensor]]] = {
        label: (solver_sampler(source), partial(run_sigmas, bed, schedule=source.schedule))
        for label, source in sources.items()
    }
    if not stock:
        pass
    elif comfy_unavailable_reason() is None:
        for scheduler in CANDIDATE_SCHEDULERS[bed.kind]:
            for name in STOCK_SAMPLERS:
                runs[f"{STOCK_PREFIX}{name} / {scheduler}"] = (
                    stock_sampler(name), partial(ksampler_sigmas, bed, name, scheduler)
                )  # fmt: skip
    else:
        sampler, label = dpmpp_2m()
        runs[f"{STOCK_PREFIX}{label}"] = (sampler, bed.sigmas)
    return {
        label: {n: preview_rmse(bed, sampler, sigmas(n).float(), noise, labels, finals) for n in steps}
        for label, (sampler, sigmas) in runs.items()
    }


def stock_rows(rows: dict[str, dict[int, float]]) -> list[str]:
    """The rows of ``judge`` that are stock samplers."""
    return [label for label in rows if label.startswith(STOCK_PREFIX)]


def ratio_to_best_stock(rows: dict[str, dict[int, float]], label: str, n: int) -> tuple[float, str]:
    """``label``'s RMSE at ``n`` steps over the best stock sampler's, and which one that was."""
    best = min(stock_rows(rows), key=lambda row: rows[row][n])
    return rows[label][n] / rows[best][n], best.removeprefix(STOCK_PREFIX)
