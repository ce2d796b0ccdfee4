"""The ConsistencySolver sampler, with ComfyUI's / k-diffusion's sampler contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from .coefficients import CoefficientSource, table_problem
from .errors import InvalidWeights


def append_dims(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """Trailing singleton dimensions up to ``ndim``, so a per-sample value broadcasts over a latent (k-diffusion)."""
    return tensor[(...,) + (None,) * (ndim - tensor.ndim)]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE; for EPS models the noise estimate, for flow the velocity.

    ``sigma`` is a number, a scalar tensor or one sigma per sample ([batch]).
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / append_dims(sigma, x.ndim)


def remember(history: list[torch.Tensor], derivative: torch.Tensor, order: int, times: int = 1) -> list[torch.Tensor]:
    """The derivative history after a model call: newest first, at most ``order`` long. A derivative enters
    ``times`` times when zero-length steps before it reused its point (see ``sample_consistency_solver``)."""
    return ([derivative] * times + history)[:order]


def multistep_update(
    x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, row: Any, history: list[torch.Tensor]
) -> torch.Tensor:
    """One ConsistencySolver step: x + (sigma_next - sigma) * sum_k row[k] * history[k], newest derivative first.

    ``sigma`` and ``sigma_next`` are numbers or per-sample tensors; weights past the history are 0 (the tables
    are checked so), so the sum stops at the shorter of the two.
    """
    blended = history[0] * row[0]
    for weight, older in zip(row[1:], history[1:], strict=False):
        blended = blended + weight * older
    step = torch.as_tensor(sigma_next, dtype=x.dtype) - torch.as_tensor(sigma, dtype=x.dtype)
    return x + append_dims(step, x.ndim) * blended


def coefficient_table(
    coefficients: CoefficientSource, sigmas: torch.Tensor, model_sampling: Any = None
) -> torch.Tensor:
    """The run's [steps, order] weights, checked once before sampling starts (InvalidWeights when unusable)."""
    sigma_to_timestep = getattr(model_sampling, "timestep", None)
    table = coefficients.weights(sigmas, sigma_to_timestep)
    steps = len(sigmas) - 1
    if table.shape != (steps, coefficients.order):
        raise InvalidWeights(f"the table has shape {tuple(table.shape)}, expected {(steps, coefficients.order)}")
    if not torch.isfinite(sigmas).all():
        raise InvalidWeights("the sigmas are not all finite")
    if not torch.isfinite(table).all():
        raise InvalidWeights("some weights are NaN or infinite")
    problem = table_problem(table, coefficients.row_sums)
    if problem:
        raise InvalidWeights(f"the rows {problem}")
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
    and flow (CONST) models. The last step to sigma = 0 is a normal step (the blended x0 estimate); a row of
    [1, 0, ...] there (a policy's ``last_step = "denoised"``) makes it the model's denoised estimate.
    A zero-length step (a repeated sigma, or ``0, 0`` at the end) moves nothing and calls no model: the
    derivative at its point is the one the next step evaluates (same x, same sigma), and enters the
    history once per step as the table expects. The history is kept and combined in float32 whatever
    the dtype of ``x``.
    ``model_sampling`` (anything with ``.timestep(sigma)``) is needed only by timestep-conditioned policies.
    """
    extra_args = {} if extra_args is None else extra_args
    table = coefficient_table(coefficients, sigmas, model_sampling).tolist()
    s_in = x.new_ones([x.shape[0]])
    state = x.float()
    history: list[torch.Tensor] = []
    zero_length = (sigmas[1:] == sigmas[:-1]).tolist()
    skipped = 0  # zero-length steps since the last model call
    for i in trange(len(sigmas) - 1, disable=disable):
        if zero_length[i]:
            skipped += 1
            continue
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
        history = remember(history, to_d(state, sigmas[i].float(), denoised.float()), len(table[i]), skipped + 1)
        skipped = 0
        state = multistep_update(state, sigmas[i].float(), sigmas[i + 1].float(), table[i], history)
    return state.to(x.dtype)
