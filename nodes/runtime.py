"""Everything that needs ComfyUI: sampler and scheduler registration, the model-folder, the Preview/Refine runs.

Imported only from ``register()`` and from node functions, i.e. inside a running ComfyUI.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import ui

from ..solver import CoefficientFileError, check_choice, coefficient_table
from ..solver import sample_consistency_solver as solver_sample
from .coefficients import (
    AUTO,
    BUNDLED_DIR,
    FOLDER_NAME,
    SCHEDULER_NAME,
    CoefficientSelection,
    calibrated_for,
    default_coefficient_path,
    describe_choice,
    learned_sigmas,
    resolve_coefficients,
)
from .fingerprint import model_fingerprint, sampling_identity
from .messages import Run, problems_of
from .preview_state import (
    DEFAULT_REFINE_SAMPLER,
    PreviewRequest,
    PreviewState,
    RefineRequest,
    check_state_fits,
    parse_selection,
    select_previews,
)

SAMPLER_NAME = "consistency_solver"
PICKS_UI_KEY = "diffusion_preview"  # the pick grid's captions in Diffusion Preview's UI output (web/pick_previews.js)
_BY_NAME = CoefficientSelection()  # what KSampler's sampler list gets: auto, stored mode, trained steps only
# KSampler's own step counting, which the by-name scheduler cannot see; named when a step count is refused.
_ONE_MORE_STEP = tuple(sorted(comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS))


def register(sampler: Callable[..., torch.Tensor], scheduler: Callable[..., torch.Tensor]) -> None:
    """Make ``consistency_solver`` a stock sampler and scheduler name (``sampler`` and ``scheduler``: this module's
    ``sample_consistency_solver`` and ``consistency_solver_scheduler``, with their problems worded by the caller) and
    ``models/consistency_solver`` a folder.

    The lists are extended in place: KSampler, KSamplerAdvanced, KSamplerSelect and BasicScheduler read
    the very objects ``comfy.samplers.SAMPLER_NAMES`` / ``KSampler.SAMPLERS`` and ``SCHEDULER_NAMES`` /
    ``KSampler.SCHEDULERS`` every time they build their inputs, and ``calculate_sigmas`` looks names up
    in ``SCHEDULER_HANDLERS``. Safe to call again (ComfyUI and the tests may both import the pack).
    """
    setattr(comfy.k_diffusion.sampling, f"sample_{SAMPLER_NAME}", sampler)
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
        if SAMPLER_NAME not in names:
            names.append(SAMPLER_NAME)
    comfy.samplers.SCHEDULER_HANDLERS[SCHEDULER_NAME] = comfy.samplers.SchedulerHandler(scheduler, use_ms=True)
    if SCHEDULER_NAME not in comfy.samplers.SCHEDULER_NAMES:
        comfy.samplers.SCHEDULER_NAMES.append(SCHEDULER_NAME)
    register_model_folder()


def register_model_folder() -> None:
    """``models/consistency_solver`` plus the pack's bundled files, listing ``.safetensors`` only."""
    user_folder = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    # extra_model_paths.yaml may have declared the key already: keep its paths, add ours.
    paths = folder_paths.folder_names_and_paths.get(FOLDER_NAME, ([], set()))[0]
    for path in (user_folder, os.fspath(BUNDLED_DIR)):
        if path not in paths:
            paths.append(path)
    folder_paths.folder_names_and_paths[FOLDER_NAME] = (paths, {".safetensors"})


def locate_file(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER_NAME, name)
    if path is None:
        raise CoefficientFileError(
            name, f"it is no longer in models/{FOLDER_NAME}/", "put it back or choose another file"
        )
    return path


def sampling_kind(model_sampling: Any) -> str:
    """``flow`` for CONST (SD3, Flux, ...), else ``eps`` (EPS and V-prediction share the ODE in sigma)."""
    return "flow" if isinstance(model_sampling, comfy.model_sampling.CONST) else "eps"


# The ModelPatcher last seen with each model_sampling object: the scheduler by name is handed only the model_sampling.
_sampling_owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_announced: dict[tuple[str, str], str] = {}


def sampling_owner(model_sampling: Any) -> Any:
    """The model (ModelPatcher) a model_sampling belongs to, when the pack has seen it or ComfyUI has it loaded, and
    only when that is one model (clones with other LoRAs share the model_sampling), else None."""
    owners = {id(patcher): patcher for patcher in [_sampling_owners.get(model_sampling)] if patcher is not None}
    for loaded in comfy.model_management.current_loaded_models:
        patcher = loaded.model
        if patcher is not None and patcher.get_model_object("model_sampling") is model_sampling:
            owners[id(patcher)] = patcher
    fingerprints = {model_fingerprint(p, sampling_kind(model_sampling)): p for p in owners.values()}
    return next(iter(fingerprints.values())) if len(fingerprints) == 1 else None


def calibrated_file(model: Any, kind: str, steps: int | None) -> str | None:
    """The file the Calibrate node made for exactly this model (weights, LoRAs, sampling) that holds ``steps``, the
    newest if several (``coefficients.calibrated_for``); one log line whenever what ``auto`` uses changes."""
    model_sampling = model.get_model_object("model_sampling")
    _sampling_owners[model_sampling] = model
    fingerprint = model_fingerprint(model, kind)
    user_folder = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    paths = [
        path
        for name in folder_paths.get_filename_list(FOLDER_NAME)
        if (path := folder_paths.get_full_path(FOLDER_NAME, name)) and Path(path).parent != BUNDLED_DIR
    ]
    calibrated = calibrated_for(paths, fingerprint, kind, steps)
    used = calibrated or f"the default {default_coefficient_path(kind).name}"
    if _announced.get((fingerprint, str(steps))) != used:
        _announced[(fingerprint, str(steps))] = used
        why = "calibrated for this model" if calibrated else f"no file in {user_folder} is calibrated for this model"
        logging.info("[consistency_solver] 'auto' uses %s for %s steps (%s)", used, steps, why)
    return calibrated


def describe_for(model: Any, selection: CoefficientSelection) -> str:
    """What a selection means for ``model``: for ``auto``, which file it uses (for any step count) and why."""
    if selection.choice != AUTO:
        return f"uses {selection.choice}"
    kind = sampling_kind(model.get_model_object("model_sampling"))
    calibrated = calibrated_file(model, kind, None)
    if calibrated is None:
        return (
            f"auto uses the pack's default {default_coefficient_path(kind).name}: no file is calibrated for this model"
        )
    return f"auto uses {os.path.basename(calibrated)}, calibrated for this model (the default for step counts it lacks)"


def resolved(model_sampling: Any, selection: CoefficientSelection, model: Any = None, **settings: Any) -> Run:
    """The run with its coefficient source: ``auto`` is the file calibrated for ``model`` (or, for the scheduler by
    name, the model the model_sampling belongs to) when there is one, else the default. A missing, broken or
    mismatched file is raised as a RunProblem."""
    kind = sampling_kind(model_sampling)
    calibrated = None
    if selection.choice == AUTO:
        owner = model if model is not None else sampling_owner(model_sampling)
        calibrated = calibrated_file(owner, kind, settings.get("steps")) if owner is not None else None
    choice = os.path.basename(calibrated) if calibrated else selection.choice
    run = Run(choice, describe_choice(choice, kind), **settings)
    with problems_of(run):
        return replace(run, source=resolve_coefficients(selection, kind, locate_file, calibrated))


def sample_consistency_solver(
    model: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    selection: CoefficientSelection = _BY_NAME,
) -> torch.Tensor:
    """The ComfyUI sampler: reads the model sampling behind KSamplerX0Inpaint to pick matching coefficients.

    By name (KSampler's list) it gets no options and uses ``auto``: the file calibrated for the model, else the
    pack's default for its family; SamplerConsistencySolver and DiffusionPreview pass their ``selection``. Every
    problem is raised, as a RunProblem, before the first model call.
    """
    patcher = model.inner_model.model_patcher
    model_sampling = patcher.get_model_object("model_sampling")
    run = resolved(model_sampling, selection, patcher, steps=len(sigmas) - 1)
    with problems_of(run):
        return solver_sample(
            model,
            x,
            sigmas,
            extra_args,
            callback,
            disable,
            coefficients=run.source,
            model_sampling=model_sampling,
        )


def consistency_sampler(selection: CoefficientSelection) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sample_consistency_solver, extra_options={"selection": selection})


def schedule_sigmas(model_sampling: Any, steps: int, denoise: float, run: Run) -> torch.Tensor:
    """The learned schedule of ``run``'s coefficients over this model's sigma range (see ``learned_sigmas``)."""
    with problems_of(run):
        return learned_sigmas(
            run.source, steps, denoise, float(model_sampling.sigma_min), float(model_sampling.sigma_max)
        )


def scheduler_node_sigmas(model: Any, steps: int, denoise: float, selection: CoefficientSelection) -> torch.Tensor:
    """The Consistency Solver Scheduler node."""
    model_sampling = model.get_model_object("model_sampling")
    run = resolved(model_sampling, selection, model, steps=steps, denoise=denoise, learned_schedule=True)
    return schedule_sigmas(model_sampling, steps, denoise, run)


def consistency_solver_scheduler(model_sampling: Any, steps: int) -> torch.Tensor:
    """The ``consistency_solver`` entry of ComfyUI's scheduler lists (``calculate_sigmas`` calls it).

    By name it uses the pack's default file for the model family, as the sampler of that name does;
    KSampler and BasicScheduler have already turned denoise into the step count.
    """
    run = resolved(model_sampling, _BY_NAME, steps=steps, learned_schedule=True, one_more_step=_ONE_MORE_STEP)
    return schedule_sigmas(model_sampling, steps, 1.0, run)


def ksampler_sigmas(model: Any, steps: int, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigmas the stock KSampler uses for (steps, scheduler, denoise), by asking ComfyUI's own KSampler."""
    check_choice("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)  # KSampler would switch silently
    sampler = comfy.samplers.KSampler(model, steps=steps, device="cpu", scheduler=scheduler, denoise=denoise)
    return sampler.sigmas


def node_sigmas(model: Any, steps: int, scheduler: str, denoise: float, run: Run) -> torch.Tensor:
    """Preview/Refine sigmas: the stock KSampler's, except that ``consistency_solver`` is the schedule
    learned with the run's (the preview's) coefficients rather than with the default file."""
    if scheduler == SCHEDULER_NAME:
        return schedule_sigmas(model.get_model_object("model_sampling"), steps, denoise, run)
    return ksampler_sigmas(model, steps, scheduler, denoise)


def fingerprint(model: Any) -> str:
    """The model's sampling identity, which a preview's state must share with its refine's model."""
    return sampling_identity(model, sampling_kind(model.get_model_object("model_sampling")))


def sample_latent(
    model: Any,
    noise: torch.Tensor,
    latent: dict[str, Any],
    sampler: Any,
    sigmas: torch.Tensor,
    cfg: float,
    positive: Any,
    negative: Any,
    seed: int,
) -> dict[str, Any]:
    """One sampling run as ComfyUI's SamplerCustom does it: progress bar, interrupt, inpaint mask."""
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        sigmas,
        positive,
        negative,
        latent["samples"],
        noise_mask=latent.get("noise_mask"),
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    out = dict(latent)
    out["samples"] = samples
    return out


def run_preview(
    model: Any, positive: Any, negative: Any, latent_image: dict[str, Any], request: PreviewRequest
) -> tuple[dict[str, Any], PreviewState]:
    """Few-step ConsistencySolver preview; its noise is exactly what the stock KSampler draws for this seed.

    Every problem with the settings (file, step count, schedule) is raised before the first model call.
    """
    model_sampling = model.get_model_object("model_sampling")
    selection = request.selection
    settings = {
        "steps": request.steps,
        "denoise": request.denoise,
        "learned_schedule": request.scheduler == SCHEDULER_NAME,
    }
    run = resolved(model_sampling, selection, model, **settings)
    sigmas = node_sigmas(model, request.steps, request.scheduler, request.denoise, run)
    with problems_of(run):
        coefficient_table(run.source, sigmas, model_sampling)
    latent = dict(latent_image)
    latent["samples"] = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent["samples"], request.seed, latent.get("batch_index"))
    sampler = consistency_sampler(selection)
    preview = sample_latent(model, noise, latent, sampler, sigmas, request.cfg, positive, negative, request.seed)
    state = PreviewState(
        seed=request.seed,
        noise=noise,
        latent=latent,
        steps=request.steps,
        scheduler=request.scheduler,
        cfg=request.cfg,
        denoise=request.denoise,
        sigmas=sigmas.cpu(),
        model_fingerprint=fingerprint(model),
        coefficients=selection.choice,
    )
    return preview, state


def preview_images(vae: Any, preview: dict[str, Any], state: PreviewState) -> dict[str, list]:
    """What Diffusion Preview shows on its node: the previews decoded as VAE Decode does and saved as Preview Image
    does (temporary files), and under PICKS_UI_KEY the seed and batch size that caption them in the pick grid
    (web/pick_previews.js). Reads the preview; neither it nor the state changes, and the model is not called."""
    images = vae.decode(preview["samples"])
    if images.ndim == 5:  # a video VAE's frames, flattened as VAE Decode flattens them
        images = images.reshape(-1, *images.shape[-3:])
    shown = ui.PreviewImage(images).as_dict()
    shown[PICKS_UI_KEY] = [{"seed": state.seed, "batch_size": state.batch_size}]
    return shown


def run_refine(model: Any, positive: Any, negative: Any, state: PreviewState, request: RefineRequest) -> dict[str, Any]:
    """The full render of the chosen previews from their own noise: equal to the stock KSampler for that seed."""
    latent_channels = model.get_model_object("latent_format").latent_channels
    check_state_fits(state, fingerprint(model), latent_channels)
    chosen = select_previews(state, parse_selection(request.select, state.batch_size))
    run = None
    if request.scheduler == SCHEDULER_NAME:
        model_sampling = model.get_model_object("model_sampling")
        selection = CoefficientSelection(state.coefficients)
        settings = {"steps": request.steps, "denoise": state.denoise, "learned_schedule": True}
        run = resolved(model_sampling, selection, model, **settings)
    sigmas = node_sigmas(model, request.steps, request.scheduler, state.denoise, run)
    sampler = request.sampler if request.sampler is not None else comfy.samplers.sampler_object(DEFAULT_REFINE_SAMPLER)
    return sample_latent(
        model, chosen.noise, chosen.latent, sampler, sigmas, request.cfg, positive, negative, state.seed
    )
