"""The learned coefficient policy of the paper (arXiv 2512.13592, sec. 3): a tiny MLP of the step's times.

For each of the ``order - 1`` free coefficients the network gives a categorical distribution over a
grid of ``bins`` values. An action vector ``a`` becomes weights by the paper's rule (newest first)::

    w_1 = 1 + a_0,   w_k = a_{k-1} (2 <= k <= h-1),   w_h = 1 - sum_{k<h} w_k

with h = min(i + 1, order) derivatives available, so every row sums to 1 and actions of dimensions
>= h-1 do not matter (they are masked in training). Inference is deterministic: the mode (argmax) or
the expectation of each distribution, never a random draw.

The step to sigma = 0 is either the policy's like any other (``last_step = "learned"``, the paper) or the row
[1, 0, ...] (``"denoised"``): with d = (x - denoised) / sigma the step x + (0 - sigma) d lands on the model's
denoised estimate, which is what every stock sampler's last step returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .coefficients import history_lengths
from .errors import UnknownChoice, UntrainedStepCount, check_choice
from .schedules import StepSchedule
from .time_features import SigmaToTimestep, time_features

INFERENCE_MODES = ("mode", "expectation")
LAST_STEPS = ("learned", "denoised")


def default_action_grids(order: int, bins: int) -> torch.Tensor:
    """The paper's grids: a_0 in [0, 2] (w_1 in [1, 3]), a_1 in [-2, 0], further dims in [-1, 1]."""
    ranges = [(0.0, 2.0), (-2.0, 0.0)] + [(-1.0, 1.0)] * max(order - 3, 0)
    # low + span * k/(bins-1) in float64 puts 0 exactly on the grid (float32 linspace misses it by 1e-8).
    fractions = torch.arange(bins, dtype=torch.float64) / (bins - 1)
    return torch.stack([low + (high - low) * fractions for low, high in ranges[: order - 1]]).float()


class ConsistencyPolicy(nn.Module):
    """``Linear(2, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(hidden, (order-1)*bins)``.

    Parameter names match the released checkpoint (``mlp.0/2/4``, ``action_values``). The last layer
    starts at zero, so an untrained policy is uniform over each grid.
    """

    def __init__(self, order: int = 4, bins: int = 11, hidden: int = 256, action_values: torch.Tensor | None = None):
        super().__init__()
        if order < 2:
            raise ValueError(f"a policy needs order >= 2 (one free coefficient), got order={order}")
        if bins < 2:
            raise ValueError(f"a policy needs at least 2 bins per coefficient, got bins={bins}")
        self.order, self.bins, self.hidden = order, bins, hidden
        self.mlp = nn.Sequential(
            nn.Linear(2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, (order - 1) * bins),
        )
        nn.init.zeros_(self.mlp[4].weight)
        nn.init.zeros_(self.mlp[4].bias)
        grids = default_action_grids(order, bins) if action_values is None else action_values.clone().float()
        if grids.shape != (order - 1, bins):
            raise ValueError(f"action_values must have shape {(order - 1, bins)}, got {tuple(grids.shape)}")
        self.register_buffer("action_values", grids)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of shape [..., order-1, bins] for time features of shape [..., 2]."""
        logits = self.mlp(features.to(self.action_values.dtype))
        return logits.unflatten(-1, (self.order - 1, self.bins))

    def actions(self, logits: torch.Tensor, mode: str = "mode") -> torch.Tensor:
        """Deterministic actions from logits: the grid value of the argmax, or the expected value."""
        if mode == "mode":
            index = logits.argmax(dim=-1, keepdim=True)
            return self.action_values.expand(*logits.shape[:-1], -1).gather(-1, index).squeeze(-1)
        if mode == "expectation":
            return (logits.softmax(dim=-1) * self.action_values).sum(dim=-1)
        raise UnknownChoice("inference mode", mode, INFERENCE_MODES)


def actions_to_weights(actions: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """The paper's offset/sum-to-1 rule. actions [M, order-1], history lengths h [M] -> weights [M, order]."""
    rows, free = actions.shape
    order = free + 1
    columns = torch.arange(order, device=actions.device)
    raw = torch.cat(
        [
            1 + actions[:, :1],
            actions[:, 1:],
            torch.zeros(rows, 1, dtype=actions.dtype, device=actions.device),
        ],
        dim=1,
    )
    history = history.to(actions.device).unsqueeze(1)
    weights = torch.where(columns < history - 1, raw, torch.zeros_like(raw))
    last = 1 - weights.sum(dim=1, keepdim=True)
    return torch.where(columns == history - 1, last, weights)


def denoised_steps(sigmas: torch.Tensor, last_step: str) -> torch.Tensor:
    """Which steps of a run take the row [1, 0, ...] under ``last_step`` (LAST_STEPS): with ``"denoised"`` the step
    to sigma = 0 (not a zero-length ``0, 0`` after it), with ``"learned"`` none. Shape [steps], bool."""
    check_choice("last step", last_step, LAST_STEPS)
    if last_step == "learned":
        return torch.zeros(len(sigmas) - 1, dtype=torch.bool)
    sigmas = sigmas.detach().cpu()
    return (sigmas[1:] == 0) & (sigmas[:-1] != 0)


def with_last_step(weights: torch.Tensor, sigmas: torch.Tensor, last_step: str) -> torch.Tensor:
    """``weights`` [..., steps, order] with the rows of ``denoised_steps`` set to [1, 0, ...]; the other rows (and
    their gradients) are kept."""
    denoised = torch.zeros_like(weights)
    denoised[..., 0] = 1
    rows = denoised_steps(sigmas, last_step).to(weights.device).unsqueeze(-1)
    return torch.where(rows, denoised, weights)


def active_action_mask(history: torch.Tensor, order: int) -> torch.Tensor:
    """Which action dimensions change the weights: dimension k is used iff k < h - 1. Shape [M, order-1]."""
    return torch.arange(order - 1).unsqueeze(0) < (history.unsqueeze(1) - 1)


@dataclass(frozen=True)
class PolicyCoefficients:
    """A trained policy bound to its time-feature definition and the step counts it was trained on."""

    policy: ConsistencyPolicy
    time_features: str
    trained_steps: tuple[int, ...]
    mode: str = "mode"
    last_step: str = "learned"  # LAST_STEPS: the policy's row at the step to sigma = 0, or the denoised estimate
    allow_untrained_steps: bool = False
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    schedule: StepSchedule | None = None  # the schedule it was trained with, when learned jointly
    row_sums = "one"  # the paper's rule: every row sums to 1

    def __post_init__(self) -> None:
        check_choice("inference mode", self.mode, INFERENCE_MODES)
        check_choice("last step", self.last_step, LAST_STEPS)

    @property
    def order(self) -> int:
        return self.policy.order

    @torch.no_grad()
    def weights(self, sigmas: torch.Tensor, sigma_to_timestep: SigmaToTimestep | None = None) -> torch.Tensor:
        steps = len(sigmas) - 1
        if steps and steps not in self.trained_steps and not self.allow_untrained_steps:
            raise UntrainedStepCount("policy", steps, self.trained_steps)
        features = time_features(sigmas, self.time_features, sigma_to_timestep)
        device = self.policy.action_values.device
        logits = self.policy(features.float().to(device))
        actions = self.policy.actions(logits, self.mode).to("cpu", torch.float64)
        return with_last_step(actions_to_weights(actions, history_lengths(steps, self.order)), sigmas, self.last_step)
