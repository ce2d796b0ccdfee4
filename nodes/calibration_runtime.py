"""The Calibrate node inside ComfyUI: its refine, its candidates, its guided models, its file.

Imported only when the node runs (it imports ``comfy``). The order is the node's: key (reuse a file made for the
same key, with no model call), check (refusals worded for the artist, before any model call), fit (ComfyUI's
sampling, entered once per prompt so that every prompt's guided model is at hand), save.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch

from ..calibration import (
    DEFAULT,
    BudgetTooSmall,
    Calibration,
    NoisePlan,
    SamplerProbe,
    TargetRun,
    calibrate,
    plan_noises,
    probe_sampler,
    record_run,
    source_candidate,
    stock_candidate,
)
from ..calibration.calibrator import CANDIDATE_SAMPLERS, CANDIDATE_SCHEDULERS
from ..solver import save_coefficients
from .calibrate import (
    NODE,
    CalibrationSettings,
    calibrated_family,
    calibrated_metadata,
    calibration_file_name,
    calibration_key,
    stored_key,
    stored_report,
)
from .coefficients import FOLDER_NAME, CoefficientSelection, default_coefficient_path, resolve_coefficients
from .fingerprint import conditioning_fingerprint, model_fingerprint
from .runtime import locate_file, sampling_kind

CALIBRATION_SEED = 0  # the noises never re-roll: the same model and settings give the same file
NOISE_FREE = ("eta", "s_noise")  # options that switch a stochastic sampler's fresh noise off, tried in this order
FALLBACK_TARGET = "euler"  # the refine matched when a stochastic sampler has neither option


def run_calibration(
    model: Any,
    prompts: list[Any],
    negative: Any,
    latent_image: dict[str, Any],
    settings: CalibrationSettings,
    file_name: str,
) -> tuple[CoefficientSelection, str]:
    """The node: reuse the file made for this key, or calibrate and save; the selection and the report."""
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    model_sampling = model.get_model_object("model_sampling")
    kind = sampling_kind(model_sampling)
    fingerprint = model_fingerprint(model, kind)
    prompts_fingerprint = conditioning_fingerprint([prompts, negative])
    per_prompt = prompts_fingerprint if settings.per_prompt else None
    key = calibration_key(fingerprint, tuple(latent.shape[1:]), settings, per_prompt)
    name = calibration_file_name(file_name, fingerprint, per_prompt)
    path = os.path.join(folder_paths.models_dir, FOLDER_NAME, name)
    if stored_key(path) == key:
        return CoefficientSelection(name), stored_report(path)

    refine_sigmas = ksampler_sigmas(model, settings.refine_sampler, settings.refine_scheduler, settings.refine_steps)
    if abs(float(refine_sigmas[0]) / float(model_sampling.sigma_max) - 1) > 1e-3:
        raise ValueError(
            f"Pick a refine scheduler in {NODE} that starts at the model's highest noise level (simple, karras, "
            f"normal, ...): {settings.refine_scheduler} starts lower, where previews from pure noise do not."
        )
    candidates = guard_candidates(model, kind, settings.steps)
    refine, target_note, probe = refine_target(model, prompts[0], negative, latent, settings, refine_sigmas)
    try:
        plan = plan_noises(settings.budget, probe.calls, settings.steps, candidates, refine_sigmas[refine_sigmas > 0])
    except BudgetTooSmall as error:
        raise ValueError(
            f"Raise the budget of {NODE} to at least {error.minimum} model calls (it is {error.budget}), or lower its "
            f"preview steps or refine steps: the smallest calibration renders the refine ({probe.calls} calls) "
            "from 6 noises, fits on 2 and checks the fit against the stock samplers on 4."
        ) from error

    progress = comfy.utils.ProgressBar(plan.model_calls)
    spent = 0

    def on_calls(count: int) -> None:
        nonlocal spent
        comfy.model_management.throw_exception_if_processing_interrupted()
        spent += count
        if count:
            progress.update_absolute(min(spent, plan.model_calls), plan.model_calls)

    calibration = fit(model, prompts, negative, latent, settings, plan, refine, refine_sigmas, candidates, on_calls)
    progress.update_absolute(plan.model_calls, plan.model_calls)
    report = f"{calibration.report()}\nThe previews are fitted to {target_note}."
    description = (
        f"Calibrated by the {NODE} node for {', '.join(map(str, settings.steps))} preview steps against "
        f"{target_note}; per step count, what measured best on held-out noises."
    )
    metadata = calibrated_metadata(key, fingerprint, prompts_fingerprint, settings, tuple(latent.shape[1:]),
                                   target_note, calibration.summary(), report)  # fmt: skip
    partial_path = f"{path}.partial"
    save_coefficients(partial_path, calibration.coefficients, model_family=calibrated_family(kind),
                      description=description, training=metadata)  # fmt: skip
    os.replace(partial_path, path)  # a cancelled or failed run leaves no file behind
    return CoefficientSelection(name), report


def ksampler_sigmas(model: Any, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas the stock KSampler uses for this sampler (which may drop the penultimate one) and scheduler."""
    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler).sigmas


def guard_candidates(model: Any, kind: str, steps: tuple[int, ...]) -> list:
    """What the fit races on held-out noises: the pack's default on its learned schedule, and the stock linear
    samplers on the schedulers of the model's family, as KSampler would run them."""
    model_sampling = model.get_model_object("model_sampling")
    default = resolve_coefficients(CoefficientSelection(), kind, locate_file)
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    candidates = [
        source_candidate(
            f"default ({default_coefficient_path(kind).name})",
            DEFAULT,
            default,
            lambda n: default.schedule.sigmas(n, sigma_min, sigma_max),
            steps,
            model_sampling,
            schedule="learned",
        )
    ]
    for scheduler in CANDIDATE_SCHEDULERS[kind]:
        for name in CANDIDATE_SAMPLERS:
            function = comfy.samplers.sampler_object(name).sampler_function
            sigmas = partial(_sigmas_for, model, name, scheduler)
            candidates.append(stock_candidate(f"{name} / {scheduler}", function, sigmas, steps, scheduler))
    return candidates


def _sigmas_for(model: Any, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
    return ksampler_sigmas(model, sampler, scheduler, steps)


def refine_target(
    model: Any, positive: Any, negative: Any, latent: torch.Tensor, settings: CalibrationSettings, sigmas: torch.Tensor
) -> tuple[Callable[..., torch.Tensor], str, SamplerProbe]:
    """The refine the previews are fitted to, found without a model call inside ComfyUI's sampling (its samplers
    read the guided model's attributes): the refine sampler itself, or for one that adds fresh noise each step its
    noise-free counterpart. The sampler function, what it is in words, and its probe (calls per noise)."""
    sampler = comfy.samplers.sampler_object(settings.refine_sampler)
    parameters = inspect.signature(sampler.sampler_function).parameters
    tries = [({}, settings.refine_sampler)]
    tries += [({option: 0.0}, f"{settings.refine_sampler} with {option} 0") for option in NOISE_FREE
              if option in parameters]  # fmt: skip
    found: dict[str, Any] = {}

    def probing(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
        options = {**sampler.extra_options}
        for extra, words in tries:
            function = partial(sampler.sampler_function, **options, **extra)
            probe = _probe(function, model_k, x, sigmas_in, extra_args)
            if probe.deterministic:
                found.update(function=function, words=words, probe=probe)
                return x
        fallback = comfy.samplers.sampler_object(FALLBACK_TARGET)
        function = partial(fallback.sampler_function, **fallback.extra_options)
        found.update(
            function=function, words=FALLBACK_TARGET, probe=_probe(function, model_k, x, sigmas_in, extra_args)
        )
        return x

    shape = (1, *latent.shape[1:])
    zeros = torch.zeros(shape, dtype=latent.dtype)
    comfy.sample.sample_custom(model, zeros, settings.cfg, comfy.samplers.KSAMPLER(probing), sigmas, positive,
                               negative, zeros, disable_pbar=True, seed=CALIBRATION_SEED)  # fmt: skip
    probe = found["probe"]
    if probe.missed is not None:
        raise ValueError(
            f"Pick a refine sampler in {NODE} that steps on its scheduler's noise levels (dpmpp_2m, euler, uni_pc, "
            f"...): {settings.refine_sampler} chooses noise levels of its own (it never evaluates the model at sigma "
            f"{probe.missed:.4g} of its schedule), so there is no fixed refine to fit previews to."
        )
    words = found["words"]
    if words == settings.refine_sampler:
        note = f"{words}/{settings.refine_scheduler} at {settings.refine_steps} steps"
    else:
        note = (
            f"{words}/{settings.refine_scheduler} at {settings.refine_steps} steps, the noise-free counterpart of "
            f"{settings.refine_sampler}: no preview can foresee the fresh noise it adds every step"
        )
    return found["function"], note, probe


def _halfway_after_cfg(x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
    """The probe's stand-in answer, passed through the post-CFG functions as ComfyUI's guider would: CFG++ samplers
    read the unconditional estimate there."""
    denoised = 0.5 * x
    model_options = extra_args.get("model_options", {})
    for function in model_options.get("sampler_post_cfg_function", []):
        denoised = function(
            {"denoised": denoised, "cond": None, "uncond": None, "cond_scale": 1.0, "model": None,
             "uncond_denoised": denoised, "cond_denoised": denoised, "sigma": sigma, "model_options": model_options,
             "input": x}
        )  # fmt: skip
    return denoised


def _probe(function: Callable[..., torch.Tensor], model_k: Any, x: torch.Tensor, sigmas: torch.Tensor,
           extra_args: dict[str, Any] | None) -> SamplerProbe:  # fmt: skip
    try:
        return probe_sampler(function, model_k, x, sigmas, extra_args, _halfway_after_cfg)
    except ValueError as error:  # the consistency_solver sampler refuses a step count it has no coefficients for
        raise ValueError(f"Pick another refine sampler or refine steps in {NODE}: {error}") from error


class InBatches:
    """A guided model called on at most ``size`` latents at a time, so calibrating needs the memory of an ordinary
    sampling run of that batch; its attributes are the model's (samplers may read them)."""

    def __init__(self, model: Any, size: int):
        self.model, self.size = model, max(1, size)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] <= self.size:
            return self.model(x, sigma, **kwargs)
        parts = [
            self.model(x[start : start + self.size], sigma[start : start + self.size], **kwargs)
            for start in range(0, x.shape[0], self.size)
        ]
        return torch.cat(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def fit(
    model: Any,
    prompts: list[Any],
    negative: Any,
    latent: torch.Tensor,
    settings: CalibrationSettings,
    plan: NoisePlan,
    refine: Callable[..., torch.Tensor],
    sigmas: torch.Tensor,
    candidates: list,
    on_calls: Callable[[int], None],
) -> Calibration:
    """Render the refine from ``plan.noises`` seeded noises (noise j on prompt j mod P), then calibrate. ComfyUI's
    sampling is entered once per prompt, nested, so that the fit can ask every prompt's guided model at once."""
    shape = (plan.noises, *latent.shape[1:])
    noise = comfy.sample.prepare_noise(torch.zeros(shape, dtype=latent.dtype), CALIBRATION_SEED)
    groups = [torch.arange(g, plan.noises, len(prompts)) for g in range(len(prompts))]
    groups = [group for group in groups if len(group)]
    order = torch.argsort(torch.cat(groups))  # from the prompts' runs, one after another, back to noise order
    model_sampling = model.get_model_object("model_sampling")
    guided: list[tuple[Any, torch.Tensor, dict[str, Any]]] = []
    result: dict[str, Calibration] = {}

    def innermost() -> None:
        # The refine runs on at most a LATENT batch at a time, each chunk a whole run: CFG++ samplers read what the
        # guided model's last call saw, so one call must be one guided call.
        size = latent.shape[0]
        runs = [
            record_run(refine, model_k, x[start : start + size], sigmas, extra_args, on_calls)
            for model_k, x, extra_args in guided
            for start in range(0, x.shape[0], size)
        ]
        joined = TargetRun.joined(runs)
        target = TargetRun(joined.sigmas, joined.states[:, order], joined.denoised[:, order], joined.finals[order],
                           joined.model_calls)  # fmt: skip
        owner = torch.cat([torch.full((len(group),), g) for g, group in enumerate(groups)])[order]

        def denoiser(x: torch.Tensor, sigma: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
            # The calibrator keeps its states on the CPU; the model gets them where ComfyUI put the noise.
            denoised = torch.empty_like(x)
            for g, (model_k, start, extra_args) in enumerate(guided):
                rows = (owner[samples] == g).nonzero().flatten()
                if len(rows):
                    batched = InBatches(model_k, latent.shape[0])
                    inputs = x[rows].to(start.device, start.dtype), sigma[rows].to(start.device)
                    denoised[rows] = batched(*inputs, **extra_args).to(x.device, x.dtype)
            return denoised

        result["calibration"] = calibrate(
            denoiser,
            target,
            plan,
            settings.steps,
            candidates,
            sigma_min=float(model_sampling.sigma_min),
            sigma_max=float(model_sampling.sigma_max),
            on_calls=on_calls,
        )

    def enter(g: int) -> None:
        if g == len(groups):
            innermost()
            return

        def entered(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
            guided.append((model_k, x, extra_args or {}))
            enter(g + 1)
            return x

        zeros = torch.zeros((len(groups[g]), *latent.shape[1:]), dtype=latent.dtype)
        comfy.sample.sample_custom(model, noise[groups[g]], settings.cfg, comfy.samplers.KSAMPLER(entered), sigmas,
                                   prompts[g], negative, zeros, disable_pbar=True, seed=CALIBRATION_SEED)  # fmt: skip

    enter(0)
    return result["calibration"]
