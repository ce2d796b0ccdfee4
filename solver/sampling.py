"""The ConsistencySolver sampler, with ComfyUI's / k-diffusion's sampler contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from .coefficients import CoefficientSource, row_sums_problem


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE; for EPS models the noise estimate, for flow the velocity."""
    return (x - denoised) / sigma


def coefficient_table(
    coefficients: CoefficientSource, sigmas: torch.Tensor, model_sampling: Any = None
) -> torch.Tensor:
    """The run's [steps, order] weights, checked once before sampling starts."""
    sigma_to_timestep = getattr(model_sampling, "timestep", None)
    table = coefficients.weights(sigmas, sigma_to_timestep)
    steps = len(sigmas) - 1
    if table.shape != (steps, coefficients.order):
        raise ValueError(f"coefficient table has shape {tuple(table.shape)}, expected {(steps, coefficients.order)}")
    if not torch.isfinite(table).all():
        raise ValueError("coefficient table contains NaN or infinite weights")
    problem = row_sums_problem(table, coefficients.row_sums)
    if problem:
        raise ValueError(f"coefficient rows {problem}")
    return table


@torch.no_grad()
def sample_consistency_solver(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    coefficients: CoefficientSource,
    model_sampling: Any = None,
) -> torch.Tensor:
    """ConsistencySolver (arXiv 2512.13592): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_k w_k(i) d_{i+1-k}.

    A linear multistep step on dx/dsigma = d with per-step weights from ``coefficients`` (a preset, a
    policy or a table). Because ``model`` returns ``denoised``, the same rule serves EPS, V-prediction
    and flow (CONST) models. The last step to sigma = 0 is a normal step (the blended x0 estimate).
    The history is kept and combined in float32 whatever the dtype of ``x``.
    ``model_sampling`` (anything with ``.timestep(sigma)``) is needed only by timestep-conditioned policies.
    """
    extra_args = {} if extra_args is None else extra_args
    table = coefficient_table(coefficients, sigmas, model_sampling).tolist()
    s_in = x.new_ones([x.shape[0]])
    state = x.float()
    history: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(state.to(x.dtype), sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback(
                {
                    "x": state.to(x.dtype),
                    "i": i,
                    "sigma": sigmas[i],
                    "sigma_hat": sigmas[i],
                    "denoised": denoised,
                }
            )
        history = [to_d(state, sigmas[i].float(), denoised.float()), *history[: len(table[i]) - 1]]
        blended = history[0] * table[i][0]
        for weight, derivative in zip(table[i][1:], history[1:], strict=False):
            blended = blended + weight * derivative
        state = state + (sigmas[i + 1] - sigmas[i]).float() * blended
    return state.to(x.dtype)
