"""The fast mode: a gradient through the unrolled solver.

The policy's *expected* action under its softmax is a smooth function of its parameters, so the
weights, the unrolled solve and a differentiable reward form one graph: one backward pass gives the
exact gradient that PPO estimates from many sampled rollouts. A policy trained this way is read out
with ``inference_mode = "expectation"``, which the file stores. The same gradient trains a free
weight table (``--form table``) and a learned schedule (``--schedule learned``).

The objective per step count is scale-free, so that few-step runs (large errors) and mixed beds of
different scales weigh alike: log of the batch's mean squared error for the ``rmse`` reward (the
benchmark's consistency RMSE, squared; a mean of per-sample RMSEs would under-weigh the few
samples that land in a wrong mode), and log of the mean reward's magnitude for the other rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import distributed
from .rewards import Reward, rmse_reward
from .rollout import unroll


def direct_loss(
    weights: torch.Tensor,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    references: torch.Tensor,
    reward: Reward,
    extra_args: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the scale-free objective (see the module docstring) and its detached rewards.

    ``weights`` is the [steps, order] table of the run, differentiable in what is trained (the policy's
    expectation, a free table) and ``sigmas`` may be too (a learned schedule).

    The normaliser is summed over all ranks, so the ranks' gradients add up to the gradient of the
    global objective.
    """
    previews = unroll(model, x, sigmas, weights, extra_args, gradient_checkpointing)
    if not previews.requires_grad:
        raise ValueError(
            "the model's output carries no gradient (its denoiser runs under torch.no_grad), so the direct mode "
            "cannot train on it; use --mode ppo, or make the denoiser differentiable"
        )
    rewards = reward(previews, references.to(previews.device, previews.dtype))
    if reward is rmse_reward:
        loss = rewards.square().sum()  # the batch's summed squared error; log of it below
    else:
        loss = -rewards.sum()
    total = distributed.all_reduce_sum(float(loss.detach()))
    return loss / abs(total), rewards.detach()
