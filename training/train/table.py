"""Free weight tables (``--form table``): one row of the paper's actions per step, for every step count.

The paper's policy ties all steps and step counts together through a small network of the step times;
a table gives each (step count, step) its own weights. It only serves the step counts it was trained
for, and it is what the direct mode optimises best: every weight gets its exact gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ...solver import StepSchedule, TableCoefficients, actions_to_weights
from ...solver.coefficients import history_lengths


class WeightTable(nn.Module):
    def __init__(self, steps: tuple[int, ...], order: int):
        super().__init__()
        self.order = order
        # Zero actions are Euler (w_1 = 1), the safe start on every schedule.
        self.actions = nn.ParameterDict({f"N{n}": nn.Parameter(torch.zeros(n, order - 1)) for n in sorted(steps)})

    def weights(self, steps: int) -> torch.Tensor:
        """The [steps, order] table (differentiable), newest derivative first, rows summing to 1."""
        return actions_to_weights(self.actions[f"N{steps}"], history_lengths(steps, self.order))

    def export(self, schedule: StepSchedule | None = None) -> TableCoefficients:
        tables = {int(name[1:]): self.weights(int(name[1:])).detach().double() for name in self.actions}
        return TableCoefficients(tables=tables, order=self.order, schedule=schedule)
