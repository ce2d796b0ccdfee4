"""The fast mode: a gradient through the unrolled solver.

The policy's *expected* action under its softmax is a smooth function of its parameters, so the
weights, the unrolled solve and a differentiable reward (minus the latent RMSE) form one graph: one
backward pass gives the exact gradient that PPO estimates from many sampled rollouts. A policy
trained this way is read out with ``inference_mode = "expectation"``, which the file stores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...solver import ConsistencyPolicy
from .rewards import Reward
from .rollout import expected_weights, unroll


def direct_loss(
    policy: ConsistencyPolicy,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    features: torch.Tensor,
    references: torch.Tensor,
    reward: Reward,
    extra_args: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minus the reward summed over the batch (the caller normalises it), and the detached rewards."""
    weights = expected_weights(policy, features)
    previews = unroll(model, x, sigmas, weights, extra_args, gradient_checkpointing)
    rewards = reward(previews, references.to(previews.dtype))
    return -rewards.sum(), rewards.detach()
