"""Rolling the solver out with weights that may differ per sample and may carry gradients.

The solver core (``solver.sample_consistency_solver``) uses one weight table for the whole batch and
runs without gradients, as an inference sampler should. Training needs two more things: a different
table per rollout (PPO samples actions per rollout) and a graph through the weights (the direct
mode). The update is the same one: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_k w_k(i) d_{i+1-k}.
With ``last_step = "denoised"`` the step to sigma = 0 takes the row [1, 0, ...] as the inference sampler does
(``solver.policy.with_last_step``): that step's actions change nothing, so they carry no gradient and, in PPO, enter
neither the log-probabilities nor the entropy bonus (``active_actions``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ...solver import ConsistencyPolicy, actions_to_weights, active_action_mask, time_features, to_d
from ...solver.coefficients import history_lengths
from ...solver.policy import denoised_steps, with_last_step


def unroll(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    weights: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """Run the multistep solver from ``x`` at sigmas[0] to sigmas[-1].

    ``weights`` is [steps, order] (one table for the batch) or [batch, steps, order] (one per sample),
    newest derivative first. Gradients flow to ``weights`` (and the model) when they require grad;
    ``gradient_checkpointing`` recomputes each model call in the backward pass instead of storing its
    activations, which is what makes the direct mode fit for large models.
    """
    extra_args = {} if extra_args is None else extra_args
    if weights.dim() == 2:
        weights = weights.unsqueeze(0).expand(x.shape[0], -1, -1)
    sigmas = sigmas.to(x.device, x.dtype)
    weights = weights.to(x.device, x.dtype)
    broadcast = (x.shape[0],) + (1,) * (x.dim() - 1)
    s_in = x.new_ones([x.shape[0]])
    order = weights.shape[-1]
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i] * s_in
        if gradient_checkpointing and torch.is_grad_enabled():
            denoised = checkpoint(lambda state, s: model(state, s, **extra_args), x, sigma, use_reentrant=False)
        else:
            denoised = model(x, sigma, **extra_args)
        history = [to_d(x, sigmas[i], denoised), *history[: order - 1]]
        blended = sum(weights[:, i, k].view(broadcast) * d for k, d in enumerate(history))
        x = x + (sigmas[i + 1] - sigmas[i]) * blended
    return x


def step_features(sigmas: torch.Tensor, kind: str, sigma_to_timestep: Callable | None = None) -> torch.Tensor:
    """The policy input for every step of a run (the one mapping, ``solver.time_features``), as float32."""
    return time_features(sigmas, kind, sigma_to_timestep).float()


def expected_weights(
    policy: ConsistencyPolicy, features: torch.Tensor, sigmas: torch.Tensor, last_step: str
) -> torch.Tensor:
    """[steps, order] weights of the run on ``sigmas`` from the policy's expected actions (the step to sigma = 0 as
    ``last_step`` says): differentiable in the policy's parameters."""
    actions = policy.actions(policy(features), mode="expectation")
    return with_last_step(actions_to_weights(actions, history_lengths(len(features), policy.order)), sigmas, last_step)


def sample_action_indices(logits: torch.Tensor, rollouts: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``rollouts`` independent action vectors per step: logits [steps, dims, bins] -> [rollouts, steps, dims]."""
    probs = logits.detach().softmax(dim=-1).flatten(0, -2)
    draws = torch.multinomial(probs, rollouts, replacement=True, generator=generator)
    return draws.T.reshape(rollouts, *logits.shape[:-1])


def indices_to_weights(
    policy: ConsistencyPolicy, indices: torch.Tensor, sigmas: torch.Tensor, last_step: str
) -> torch.Tensor:
    """Grid indices [rollouts, steps, dims] -> weights [rollouts, steps, order] of the run on ``sigmas`` by the
    paper's rule (the step to sigma = 0 as ``last_step`` says)."""
    rollouts, steps, dims = indices.shape
    grids = policy.action_values.detach().to(torch.float64)
    actions = grids.expand(rollouts, steps, dims, -1).gather(-1, indices.unsqueeze(-1)).squeeze(-1)
    history = history_lengths(steps, policy.order).repeat(rollouts)
    weights = actions_to_weights(actions.reshape(rollouts * steps, dims), history).reshape(rollouts, steps, dims + 1)
    return with_last_step(weights, sigmas, last_step)


def active_actions(order: int, sigmas: torch.Tensor, last_step: str) -> torch.Tensor:
    """Which action dimensions of the run on ``sigmas`` change its weights, [steps, order-1]: those the history
    uses, on every step but one that ``last_step`` sets to the denoised estimate."""
    steps = len(sigmas) - 1
    return active_action_mask(history_lengths(steps, order), order) & ~denoised_steps(sigmas, last_step).unsqueeze(1)
