"""The project's own reimplementations of stock samplers, used where ComfyUI is not importable.

These are labelled "project reimplementation" wherever they appear in results; with ComfyUI present the
benchmark calls ComfyUI's own functions instead (``comfy_backend.stock_sampler``). Euler needs no
separate code: it is the solver's ``Preset("euler")``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import trange

from ..solver import Preset, sample_consistency_solver

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
    if name not in BASELINE_SAMPLERS:
        raise ValueError(f"no project reimplementation of {name!r}; available: {', '.join(BASELINE_SAMPLERS)}")
    return BASELINE_SAMPLERS[name]
