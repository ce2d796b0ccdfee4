"""A schedule learned jointly with the weights (the direct mode's ``--schedule learned``).

Per step count N, N logits; their softmax is the N-1 log-sigma increments between the steps plus the
slack left between the last nonzero sigma and sigma_min. So the first sigma stays at sigma_max (where
sampling from noise starts), the sigmas always decrease, and the last nonzero one may stop short of
sigma_min (the flow schedules end their last step from a large sigma). Positions are relative to the
model's sigma range (``solver.schedules``), so one schedule serves every bed of a family.
"""

from __future__ import annotations

import torch
from torch import nn

from ...solver.schedules import StepSchedule, schedule_positions, sigmas_from_positions

# Increments are initialised from the bed's default schedule; a zero slack (karras ends at sigma_min)
# becomes this small share so that its logit is finite and can still grow.
_MIN_SHARE = 1e-3


class LearnedSchedule(nn.Module):
    def __init__(self, initial: dict[int, torch.Tensor]):
        """``initial[N]``: the N starting positions (a default schedule's ``schedule_positions``)."""
        super().__init__()
        self.logits = nn.ParameterDict()
        for steps, positions in sorted(initial.items()):
            positions = positions.to(torch.float64)
            shares = torch.cat([positions.diff(), (1 - positions[-1:]).clamp_min(0)]).clamp_min(_MIN_SHARE)
            self.logits[f"N{steps}"] = nn.Parameter(shares.log().float())

    @classmethod
    def from_default(cls, bed, steps: tuple[int, ...]) -> LearnedSchedule:
        """Start from ``bed``'s default schedule for every step count."""
        return cls({n: schedule_positions(bed.sigmas(n), bed.sigma_min, bed.sigma_max).clamp(0, 1) for n in steps})

    def positions(self, steps: int) -> torch.Tensor:
        shares = self.logits[f"N{steps}"].double().softmax(dim=0)
        return torch.cat([shares.new_zeros(1), shares[:-1].cumsum(dim=0)])

    def sigmas(self, steps: int, bed) -> torch.Tensor:
        """The N+1 sigmas (float64, differentiable) of an N-step run on ``bed``'s sigma range."""
        return sigmas_from_positions(self.positions(steps), bed.sigma_min, bed.sigma_max)

    def export(self) -> StepSchedule:
        steps = (int(name[1:]) for name in self.logits)
        return StepSchedule({n: self.positions(n).detach().clone() for n in steps})
