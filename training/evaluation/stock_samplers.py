"""Stock samplers for evaluation: ComfyUI's own (imported in-process, never vendored) and the project's
reimplementations, used where ComfyUI is not importable.

``import_comfy`` makes ``comfy`` importable on a CPU-only machine and ``stock_sampler`` returns ComfyUI's sampler
functions, which take the same ``model(x, sigma)`` callable as this project's samplers. None of the eight samplers
used here looks up ``model.inner_model.model_patcher`` or ``model_sampling`` (checked in ComfyUI 0.3.64's
``comfy/k_diffusion/sampling.py`` and ``comfy/extra_samplers/uni_pc.py``), so a test bed's ``model(labels)`` is
passed to them directly, with no wrapper objects.

The reimplementations are labelled "project reimplementation" wherever they appear in results. Euler needs no
separate code: it is the solver's ``Preset("euler")``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import trange

from ...solver import Preset, check_choice, sample_consistency_solver

BASELINE_LABEL = "project reimplementation"


@torch.no_grad()
def sample_dpmpp_2m(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) in k-diffusion's sigma form.

    With lambda = -log sigma and h_i = lambda_{i+1} - lambda_i the step is the exponential integrator
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h_i) D_i, where D_i is the denoised estimate,
    extrapolated linearly in lambda from the previous one (r = h_{i-1} / h_i) after the first step.
    The step to sigma = 0 returns the denoised estimate, as every stock sampler ends.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    previous_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            blended = denoised
            if previous_denoised is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * blended
        previous_denoised = denoised
    return x


BASELINE_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": partial(sample_consistency_solver, coefficients=Preset("euler")),
    "dpmpp_2m": sample_dpmpp_2m,
}


def baseline_sampler(name: str) -> Callable[..., Tensor]:
    """The project's reimplementation of a stock sampler (``euler`` or ``dpmpp_2m``), sampler contract."""
    check_choice("reimplemented sampler", name, tuple(BASELINE_SAMPLERS))
    return BASELINE_SAMPLERS[name]


STOCK_SAMPLERS = ("euler", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2", "res_multistep")


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"))


def import_comfy() -> ModuleType:
    """Return ``comfy.k_diffusion.sampling``, importing ComfyUI from ``COMFYUI_PATH`` (default /opt/ComfyUI).

    Without CUDA, ``comfy.cli_args.args.cpu`` is set before anything imports ``comfy.model_management``,
    which otherwise fails at import on CPU-only torch. Raises ImportError naming the fix when ComfyUI is absent.
    """
    if "comfy.k_diffusion.sampling" in sys.modules:
        return sys.modules["comfy.k_diffusion.sampling"]
    root = comfyui_path()
    if "comfy" not in sys.modules:
        if not (root / "comfy" / "k_diffusion" / "sampling.py").is_file():
            raise ImportError(f"ComfyUI not found at {root}: set COMFYUI_PATH to a ComfyUI checkout (0.3.64 or later)")
        # Appended, not prepended: ComfyUI's top-level names (tests, utils, app) must not shadow ours.
        if str(root) not in sys.path:
            sys.path.append(str(root))
    if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
        from comfy.cli_args import args

        args.cpu = True
    import comfy.k_diffusion.sampling

    return comfy.k_diffusion.sampling


@cache
def comfy_unavailable_reason() -> str | None:
    """None when ComfyUI's samplers import, else why not (for "absent" rows and test skips)."""
    try:
        import_comfy()
        import comfy.samplers  # noqa: F401  (stock_sampler_sigmas reads KSampler's settings)
    except Exception as error:  # any import-time failure means the same thing: no ComfyUI rows
        return f"ComfyUI not importable: {error}"
    return None


def stock_sampler(name: str) -> Callable[..., Tensor]:
    """ComfyUI's sampler function ``name`` (one of ``STOCK_SAMPLERS``), with the k-diffusion sampler contract."""
    check_choice("stock sampler", name, STOCK_SAMPLERS)
    sampling = import_comfy()
    if name in ("uni_pc", "uni_pc_bh2"):
        from comfy.extra_samplers import uni_pc

        function = uni_pc.sample_unipc if name == "uni_pc" else uni_pc.sample_unipc_bh2
    else:
        function = getattr(sampling, f"sample_{name}")

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        # ComfyUI's KSAMPLER always passes a dict; sample_unipc fails on None.
        return function(model, x, sigmas, {} if extra_args is None else extra_args, callback, disable)

    return sampler


def stock_sampler_sigmas(name: str, schedule: Callable[[int], Tensor], steps: int) -> Tensor:
    """The sigmas ComfyUI's KSampler gives sampler ``name`` for ``steps`` steps of ``schedule``.

    KSampler computes ``steps + 1`` steps and drops the penultimate sigma for the samplers in
    ``KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS`` (uni_pc, uni_pc_bh2, dpm_2...), so they still take
    ``steps`` model calls but end from a lower last sigma. UniPC then stops at sigma = 0.001 instead of 0
    (inside ``sample_unipc``); both are what a ComfyUI user gets and are kept.
    """
    import_comfy()
    import comfy.samplers

    if name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = schedule(steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return schedule(steps)


def dpmpp_2m() -> tuple[Callable[..., Tensor], str]:
    """The dpmpp_2m every result compares with, and the label results give it: ComfyUI's when ComfyUI imports,
    else the project's reimplementation, saying so."""
    if comfy_unavailable_reason() is None:
        return stock_sampler("dpmpp_2m"), "ComfyUI dpmpp_2m"
    return sample_dpmpp_2m, f"dpmpp_2m ({BASELINE_LABEL})"


def stock_comparison(
    schedule: Callable[[int], Tensor],
) -> dict[str, tuple[Callable[..., Tensor], Callable[[int], Tensor]]]:
    """The stock samplers every result compares with, {label: (sampler, steps -> sigmas)}: each of ComfyUI's on the
    sigmas KSampler gives it for ``schedule`` when ComfyUI imports, else the project's dpmpp_2m on ``schedule``."""
    if comfy_unavailable_reason() is None:
        return {
            f"ComfyUI {name}": (stock_sampler(name), partial(stock_sampler_sigmas, name, schedule))
            for name in STOCK_SAMPLERS
        }
    sampler, label = dpmpp_2m()
    return {label: (sampler, schedule)}


def is_stock_label(label: str) -> bool:
    """Whether a result row named ``label`` is one of ``stock_comparison``'s."""
    return label.startswith("ComfyUI ") or label == f"dpmpp_2m ({BASELINE_LABEL})"


def stock_name(label: str) -> str:
    """The sampler of a ``stock_comparison`` row, whatever follows its label: ``ComfyUI euler (...)`` -> ``euler``;
    the project's ``dpmpp_2m (project reimplementation)`` -> ``dpmpp_2m``."""
    return label.removeprefix("ComfyUI ").split(" ")[0]
