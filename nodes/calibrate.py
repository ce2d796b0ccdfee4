"""The Consistency Solver Calibrate node: fit coefficients to the user's own model, forward-only, in the graph.

It renders the refine the user will run (ComfyUI's own sampler, scheduler and steps) from a few seeded noises,
then fits a table and a schedule with ``training.calibration`` so that previews land on those finals. The file
goes to ``models/consistency_solver/<name>.safetensors``; its metadata fingerprints the model, the conditioning,
the settings and the calibrator's revision, so a second run with the same inputs loads it without a single model
call, and a file made by an older calibrator is fitted again.

Importing this module needs no ComfyUI (``definitions`` lists the node); ComfyUI is imported when it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import widgets
from .coefficients import FOLDER_NAME, CoefficientSelection
from .preview_state import DEFAULT_REFINE_SAMPLER
from .widgets import CATEGORY, COEFFICIENTS_TYPE, REFINE_SCHEDULER, SEED_MAX

NODE = "Consistency Solver Calibrate"
DEFAULT_STEPS = "5,8"
DEFAULT_BUDGET = 3000
DEFAULT_NOISES = 32  # with the default 30-step refine: 32 x (30 + 4 + 7) = 1,312 model calls
REFINE_STEPS = 30
# Model calls per step of stock samplers that evaluate the model more than once a step (the rest: one).
CALLS_PER_STEP = {
    "heun": 2,
    "heunpp2": 3,
    "dpm_2": 2,
    "dpm_2_ancestral": 2,
    "dpmpp_2s_ancestral": 2,
    "dpmpp_2s_ancestral_cfg_pp": 2,
    "dpmpp_sde": 2,
    "dpmpp_sde_gpu": 2,
    "dpmpp_2m_sde_heun": 2,
    "dpmpp_2m_sde_heun_gpu": 2,
    "seeds_2": 2,
    "seeds_3": 3,
    "sa_solver_pece": 2,
}
# Samplers whose number of model calls is not fixed in advance, or that are not plain k-diffusion functions.
UNSUPPORTED_REFINE_SAMPLERS = ("dpm_fast", "dpm_adaptive", "uni_pc", "uni_pc_bh2")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def parse_steps(text: str) -> tuple[int, ...]:
    """``"5,8"`` -> (5, 8); the wording is the node's."""
    try:
        steps = tuple(sorted({int(part) for part in text.replace(" ", "").split(",") if part}))
    except ValueError:
        steps = ()
    if not steps or steps[0] < 1:
        raise ValueError(
            f"write the preview step counts as positive whole numbers separated by commas, e.g. 5,8 (got {text!r})"
        )
    return steps


def calibration_file_name(name: str) -> str:
    """The file the node writes for ``name`` (a plain name, no folders)."""
    name = name.strip().removesuffix(".safetensors")
    if not _NAME.match(name):
        raise ValueError(
            f"Give the file name of {NODE} as a plain name of letters, digits, '.', '_', '-' or spaces, without "
            f"folders (it reads {name!r})."
        )
    return f"{name}.safetensors"


class ConsistencySolverCalibrate:
    DESCRIPTION = (
        "Fits ConsistencySolver coefficients to this model and these prompts in minutes, with forward passes "
        "only: it renders the refine you will run from a few noises and fits previews to land on them. "
        "Runs again with the same inputs reuse the file without model calls."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (COEFFICIENTS_TYPE,)
    RETURN_NAMES = ("coefficients",)
    OUTPUT_TOOLTIPS = (
        "The calibrated coefficients (with their schedule), for Diffusion Preview, the sampler and scheduler nodes.",
    )
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the previews will run on."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt the previews will use."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt the previews will use."}),
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "Its size is the size calibrated for, its batch size how many latents go through "
                        "the model at once (e.g. Empty Latent Image)."
                    },
                ),
                "noises": (
                    "INT",
                    {
                        "default": DEFAULT_NOISES,
                        "min": 1,
                        "max": 4096,
                        "tooltip": "How many seeded noises to calibrate on; each costs one refine run.",
                    },
                ),
                "cfg": widgets.cfg_input(
                    "Prompt strength (classifier-free guidance) of the final render, as in KSampler."
                ),
                "preview_steps": (
                    "STRING",
                    {"default": DEFAULT_STEPS, "tooltip": "The preview step counts to calibrate, e.g. 5,8."},
                ),
                "refine_sampler": (
                    widgets.sampler_names(),
                    {
                        "default": DEFAULT_REFINE_SAMPLER,
                        "tooltip": "The sampler of the final render the previews should match.",
                    },
                ),
                "refine_scheduler": (
                    widgets.scheduler_names(),
                    {"default": REFINE_SCHEDULER, "tooltip": "The scheduler of the final render."},
                ),
                "refine_steps": (
                    "INT",
                    {"default": REFINE_STEPS, "min": 2, "max": 1000, "tooltip": "The steps of the final render."},
                ),
                "seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": "Seeds the calibration noises."},
                ),
                "budget": (
                    "INT",
                    {
                        "default": DEFAULT_BUDGET,
                        "min": 1,
                        "max": 10_000_000,
                        "tooltip": "The most model calls it may spend, the refine runs included (one call = one "
                        "latent through the model, both CFG halves together). It needs noises x (refine steps + "
                        "preview steps - 1 per count); a smaller budget is refused before any call.",
                    },
                ),
                "file_name": (
                    "STRING",
                    {"default": "calibrated", "tooltip": "Saved as models/consistency_solver/<name>.safetensors."},
                ),
            }
        }

    def calibrate(
        self,
        model: Any,
        positive: Any,
        negative: Any,
        latent_image: dict[str, Any],
        noises: int,
        cfg: float,
        preview_steps: str,
        refine_sampler: str,
        refine_scheduler: str,
        refine_steps: int,
        seed: int,
        budget: int,
        file_name: str,
    ) -> tuple[CoefficientSelection]:
        settings = CalibrationSettings(
            noises=noises,
            cfg=cfg,
            steps=parse_steps(preview_steps),
            refine_sampler=refine_sampler,
            refine_scheduler=refine_scheduler,
            refine_steps=refine_steps,
            seed=seed,
            budget=budget,
        )
        name = calibration_file_name(file_name)
        return (run_calibration(model, positive, negative, latent_image, settings, name),)


@dataclass(frozen=True)
class CalibrationSettings:
    """The node's settings, as stored in the file."""

    noises: int
    cfg: float
    steps: tuple[int, ...]
    refine_sampler: str
    refine_scheduler: str
    refine_steps: int
    seed: int
    budget: int


def tensor_digest(digest: Any, value: Any) -> None:
    """Feed a conditioning value (tensors, lists, dicts, plain values) into a hash."""
    if isinstance(value, torch.Tensor):
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for item in value:
            tensor_digest(digest, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            tensor_digest(digest, value[key])
    else:
        digest.update(repr(value).encode())


def conditioning_fingerprint(positive: Any, negative: Any) -> str:
    digest = hashlib.sha256()
    tensor_digest(digest, positive)
    digest.update(b"|negative|")
    tensor_digest(digest, negative)
    return digest.hexdigest()[:24]


def model_fingerprint(model: Any) -> str:
    """The model's weights (a few values of every tensor), its patches (LoRAs) and its sampling, hashed."""
    digest = hashlib.sha256()
    digest.update(type(model.model).__name__.encode())
    for name, tensor in model.model.diffusion_model.state_dict().items():
        flat = tensor.detach().flatten()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy().tobytes())
    for key in sorted(model.patches):
        for patch in model.patches[key]:
            digest.update(f"{key}{patch[0]}{patch[2] if len(patch) > 2 else ''}".encode())
            tensor_digest(digest, patch[1])
    model_sampling = model.get_model_object("model_sampling")
    digest.update(
        f"{type(model_sampling).__name__}{float(model_sampling.sigma_min)}{float(model_sampling.sigma_max)}".encode()
    )
    return digest.hexdigest()[:24]


class InBatches:
    """ComfyUI's guided denoiser called on at most ``size`` latents at a time, so calibrating needs the memory of an
    ordinary sampling run of that batch; everything else is forwarded to it (samplers may read its attributes)."""

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


def stored_fingerprint(path: str) -> str | None:
    """The fingerprint a calibrated file was made with, or None (no file, or not a calibration)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as handle:
        training = json.loads((handle.metadata() or {}).get("training", "{}"))
    return training.get("fingerprint")


def run_calibration(
    model: Any, positive: Any, negative: Any, latent_image: dict[str, Any], settings: CalibrationSettings, name: str
) -> CoefficientSelection:
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import folder_paths

    from ..solver import save_coefficients
    from ..training.calibration import (
        CALIBRATOR_REVISION,
        BudgetTooSmall,
        calibrate_model,
        check_budget,
        minimum_budget,
    )
    from .runtime import ksampler_sigmas, sampling_kind

    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    shape = (settings.noises, *latent.shape[1:])
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "model": model_fingerprint(model),
                "conditioning": conditioning_fingerprint(positive, negative),
                "settings": asdict(settings),
                "shape": shape,
                "calibrator": CALIBRATOR_REVISION,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    folder = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    path = os.path.join(folder, name)
    selection = CoefficientSelection(name)
    if stored_fingerprint(path) == fingerprint:
        return selection  # calibrated before with exactly these inputs

    if settings.refine_sampler in UNSUPPORTED_REFINE_SAMPLERS:
        raise ValueError(
            f"Choose another refine sampler in {NODE} (dpmpp_2m, euler, deis, ipndm, ...): "
            f"{settings.refine_sampler} has no fixed number of model calls per step to budget for."
        )
    if settings.refine_steps < max(settings.steps):
        raise ValueError(
            f"Give {NODE} at least {max(settings.steps)} refine steps, or fewer preview steps: a preview steps "
            f"through the refine run's own noise levels."
        )
    refine = comfy.samplers.sampler_object(settings.refine_sampler)
    sigmas = ksampler_sigmas(model, settings.refine_steps, settings.refine_scheduler, 1.0)
    target_calls = settings.noises * (len(sigmas) - 1) * CALLS_PER_STEP.get(settings.refine_sampler, 1)
    try:
        check_budget(settings.budget, target_calls, settings.noises, settings.steps)
    except BudgetTooSmall as error:
        raise ValueError(
            f"Raise the budget of {NODE} to at least {error.minimum} model calls (it is {error.budget}), or lower "
            f"its noises, preview steps or refine steps: the {error.noises} refine runs take {error.target_calls} "
            f"calls and one preview of {'+'.join(map(str, error.steps))} steps per noise "
            f"{error.minimum - error.target_calls}."
        ) from error

    model_sampling = model.get_model_object("model_sampling")
    if abs(float(sigmas[0]) / float(model_sampling.sigma_max) - 1) > 1e-3:
        raise ValueError(
            f"Pick a refine scheduler in {NODE} that starts at the model's highest noise level (simple, karras, "
            f"normal, ...): {settings.refine_scheduler} starts lower, where previews from pure noise do not."
        )
    # The refine runs and one rollout per preview step count: what the calibration spends (within the budget).
    planned = minimum_budget(target_calls, settings.noises, settings.steps)
    progress = comfy.utils.ProgressBar(planned)
    spent = 0
    result = {}

    def on_calls(count: int) -> None:
        nonlocal spent
        comfy.model_management.throw_exception_if_processing_interrupted()
        spent += count
        if count:
            progress.update_absolute(min(spent, planned), planned)

    def refine_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        return refine.sampler_function(
            model_k, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **refine.extra_options
        )

    def calibrating_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        # Inside ComfyUI's sampling run: model_k is the guided denoiser and x the noise as KSampler scales it.
        result["calibration"] = calibrate_model(
            InBatches(model_k, latent.shape[0]),
            x,
            sigmas,
            refine_function,
            settings.steps,
            settings.budget,
            sigma_min=float(model_sampling.sigma_min),
            sigma_max=float(model_sampling.sigma_max),
            extra_args=extra_args,
            calls_per_step=CALLS_PER_STEP.get(settings.refine_sampler, 1),
            on_calls=on_calls,
        )
        return x

    noise = comfy.sample.prepare_noise(torch.zeros(shape, dtype=latent.dtype), settings.seed)
    comfy.sample.sample_custom(
        model,
        noise,
        settings.cfg,
        comfy.samplers.KSAMPLER(calibrating_sampler),
        sigmas,
        positive,
        negative,
        torch.zeros(shape, dtype=latent.dtype),
        disable_pbar=True,
        seed=settings.seed,
    )
    calibration = result["calibration"]
    progress.update_absolute(planned, planned)
    partial = f"{path}.partial"
    save_coefficients(
        partial,
        calibration.coefficients,
        model_family=f"calibrated-{sampling_kind(model_sampling)}",
        description=f"Calibrated by the Consistency Solver Calibrate node for {', '.join(map(str, settings.steps))} "
        f"preview steps against {settings.refine_sampler}/{settings.refine_scheduler} at {settings.refine_steps} steps",
        training={
            "fingerprint": fingerprint,
            "model_fingerprint": model_fingerprint(model),
            "conditioning_fingerprint": conditioning_fingerprint(positive, negative),
            "settings": asdict(settings),
            "latent_shape": list(shape),
            **calibration.summary(),
        },
    )
    os.replace(partial, path)  # a cancelled or failed run leaves no file behind
    return selection
