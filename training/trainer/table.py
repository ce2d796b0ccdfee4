"""Free weight tables (``--form table``): one row of the paper's actions per step, for every step count.

The paper's policy ties all steps and step counts together through a small network of the step times;
a table gives each (step count, step) its own weights. It only serves the step counts it was trained
for, and it is what the direct mode optimises best: every weight gets its exact gradient.

With ``free_row_sums`` each row is also scaled by a learned positive step scale (``--row-sums free``,
``solver.coefficients``): on the mixtures it halves the 5-step error, mostly by shortening the first steps.
"""

from __future__ import annotations

import torch
from torch import nn

from ...solver import StepSchedule, TableCoefficients, actions_to_weights
from ...solver.coefficients import history_lengths


class WeightTable(nn.Module):
    def __init__(self, steps: tuple[int, ...], order: int, free_row_sums: bool = False):
        super().__init__()
        self.order = order
        # Zero actions (and zero log scales) are Euler (w_1 = 1), the safe start on every schedule.
        self.actions = nn.ParameterDict({f"N{n}": nn.Parameter(torch.zeros(n, order - 1)) for n in sorted(steps)})
        self.log_scales = (
            nn.ParameterDict({f"N{n}": nn.Parameter(torch.zeros(n)) for n in sorted(steps)}) if free_row_sums else None
        )

    def weights(self, steps: int) -> torch.Tensor:
        """The [steps, order] table (differentiable), newest derivative first, rows summing to 1 or the scales."""
        table = actions_to_weights(self.actions[f"N{steps}"], history_lengths(steps, self.order))
        if self.log_scales is None:
            return table
        return table * self.log_scales[f"N{steps}"].exp().unsqueeze(1)

    def step_parameters(self, steps: int) -> list[nn.Parameter]:
        """The parameters of one step count's table."""
        scales = [] if self.log_scales is None else [self.log_scales[f"N{steps}"]]
        return [self.actions[f"N{steps}"], *scales]

    def export(self, schedule: StepSchedule | None = None) -> TableCoefficients:
        tables = {int(name[1:]): self.weights(int(name[1:])).detach().double() for name in self.actions}
        row_sums = "one" if self.log_scales is None else "free"
        return TableCoefficients(tables=tables, order=self.order, schedule=schedule, row_sums=row_sums)
