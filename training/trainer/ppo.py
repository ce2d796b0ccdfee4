"""The paper's policy-gradient update (paper-spec 2.4) with the released code's bugs fixed (spec 5, items 6-7).

One *group* is a set of rollouts of the same (condition, noise, step count) that differ only in
their sampled actions. Per group:

- advantages are the rewards normalised within the group, with a floor on the std so that a
  sharpened policy (near-identical rollouts) does not blow float noise up to unit advantages;
- the ratio is exp(log pi_new - log pi_old) of the joint probability over the *active* action
  dimensions only (a dimension is inactive while the history is too short to use it);
- the loss is the clipped surrogate averaged over the group's decisions, minus an entropy bonus
  over the active dimensions, normalised by log(bins);
- several epochs reuse the same rollouts, so the clipping actually acts (the release ran one epoch:
  REINFORCE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...solver import ConsistencyPolicy


@dataclass(frozen=True)
class PPOSettings:
    rollouts: int = 16  # rollouts per group (the paper: 80)
    epochs: int = 4  # passes over each batch of rollouts (the release: 1, which disables clipping)
    clip: float = 0.2
    entropy_coef: float = 0.01
    std_floor: float = 1e-3  # in reward units; below this spread a group carries no signal


@dataclass
class Group:
    """The rollouts of one (condition, noise, step count): what the update needs, all detached."""

    features: torch.Tensor  # [steps, 2] time features
    indices: torch.Tensor  # [rollouts, steps, dims] sampled grid indices
    active: torch.Tensor  # [steps, dims] bool, which dimensions changed the weights
    old_log_probs: torch.Tensor  # [rollouts, steps] joint log-prob of the active dims at sampling time
    advantages: torch.Tensor  # [rollouts]
    rewards: torch.Tensor  # [rollouts]


def group_advantages(rewards: torch.Tensor, std_floor: float) -> torch.Tensor:
    """(r - mean) / max(std, floor) within one group of rollouts."""
    centred = rewards - rewards.mean()
    return centred / rewards.std(unbiased=False).clamp(min=std_floor)


def log_probs_and_entropy(
    logits: torch.Tensor, indices: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint log-prob of the chosen actions over active dims [rollouts, steps] and entropy / log(bins) [steps, dims].

    logits [steps, dims, bins], indices [rollouts, steps, dims], active [steps, dims].
    """
    log_p = logits.log_softmax(dim=-1)
    chosen = log_p.expand(indices.shape[0], *log_p.shape).gather(-1, indices.unsqueeze(-1)).squeeze(-1)
    joint = (chosen * active).sum(dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1) / math.log(logits.shape[-1])
    return joint, entropy


def clipped_loss(
    new_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    active: torch.Tensor,
    clip: float,
    entropy_coef: float,
) -> torch.Tensor:
    """PPO's clipped surrogate for one group, over the decisions (steps with an active dim), minus the entropy bonus.

    new/old log-probs [rollouts, steps], advantages [rollouts], entropy and active [steps, dims].
    """
    decisions = active.any(dim=-1)
    ratio = (new_log_probs - old_log_probs)[:, decisions].exp()
    advantage = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return -surrogate.mean() - entropy_coef * entropy[active].mean()


def group_loss(policy: ConsistencyPolicy, group: Group, settings: PPOSettings) -> torch.Tensor:
    """The current policy's PPO loss on one group's stored rollouts."""
    new_log_probs, entropy = log_probs_and_entropy(policy(group.features), group.indices, group.active)
    return clipped_loss(
        new_log_probs,
        group.old_log_probs,
        group.advantages,
        entropy,
        group.active,
        settings.clip,
        settings.entropy_coef,
    )
