"""Coefficient sources: everything that turns a run's sigmas into the per-step weight table.

The sampler takes ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * sum_k w_k(i) d_{i+1-k}``. A source
gives the table ``w`` of shape [steps, order] (float64, CPU), newest derivative first; row i has
``min(i + 1, order)`` usable entries (the rest are 0) and sums to 1. Every source (a preset, a
learned policy, a plain table) answers ``weights(sigmas, sigma_to_timestep)`` once per run, and
has a ``schedule``: the learned ``StepSchedule`` it was trained with, or None (it works on any sigmas).

A table may instead declare ``row_sums = "free"``: each row sums to a learned positive step scale s_i, so
the step moves ``s_i (sigma_{i+1} - sigma_i)`` along the blended derivative while the model still sees the
schedule's sigmas (the scale transform of bespoke solvers). Such a table is no longer first-order
consistent, which a table can afford: it only serves the step counts it was trained for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .errors import UntrainedStepCount, check_choice
from .schedules import StepSchedule
from .time_features import SigmaToTimestep

PRESET_NAMES = ("euler", "ab2", "ab3", "ab4", "ipndm")
# "one": rows sum to 1 (first-order consistency); "free": a table's rows sum to learned positive step scales.
ROW_SUMS = ("one", "free")

# ComfyUI's sample_ipndm: Adams-Bashforth coefficients for equal steps, newest first.
_IPNDM_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@runtime_checkable
class CoefficientSource(Protocol):
    order: int
    schedule: StepSchedule | None
    row_sums: str

    def weights(self, sigmas: torch.Tensor, sigma_to_timestep: SigmaToTimestep | None = None) -> torch.Tensor: ...


def table_problem(table: torch.Tensor, row_sums: str) -> str | None:
    """What is wrong with a [steps, order] weight table under ``row_sums`` (see ROW_SUMS), or None.

    Row i may weigh only the ``min(i + 1, order)`` derivatives that exist at that step: weight on a
    later column would have nothing to multiply, and dropping it would shorten the step.
    """
    history = history_lengths(table.shape[0], table.shape[1])
    unavailable = torch.arange(table.shape[1]).unsqueeze(0) >= history.unsqueeze(1)
    early = (table.ne(0) & unavailable).any(dim=1).nonzero().flatten().tolist()
    if early:
        i = early[0]
        return (
            f"put weight on derivatives that do not exist yet (row {i}: {table[i].tolist()}, {int(history[i])} exist)"
        )
    sums = table.sum(dim=1)
    if row_sums == "one" and not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        return f"do not sum to 1 (first-order consistency): {sums.tolist()}"
    if not (sums > 0).all():
        return f"must sum to positive step scales: {sums.tolist()}"
    return None


def history_lengths(steps: int, order: int) -> torch.Tensor:
    """How many derivatives each step can combine: min(i + 1, order)."""
    return torch.arange(1, steps + 1).clamp(max=order)


def adams_bashforth_weights(sigmas: torch.Tensor, order: int) -> torch.Tensor:
    """Variable-step Adams-Bashforth in sigma: integrate the Lagrange interpolant of the history.

    With u = (s - sigma_i) / (sigma_{i+1} - sigma_i) the weights solve sum_j w_j u_j^p = 1/(p+1)
    for p < h, i.e. the step is exact for derivatives that are polynomials of degree h-1 in sigma.

    Repeated sigmas: a zero-length step moves nothing whatever its weights (the sampler skips it), so its
    row is Euler's. A sigma repeated in the history is one interpolation node, not two (the sampler's
    derivatives there are equal: same x, same sigma), so only its newest entry gets weight and the order
    falls to the number of distinct sigmas available, as at the start of a run.
    """
    sigmas = sigmas.detach().to("cpu", torch.float64)
    steps = len(sigmas) - 1
    table = torch.zeros(steps, order, dtype=torch.float64)
    for i, h in enumerate(history_lengths(steps, order).tolist()):
        length = sigmas[i + 1] - sigmas[i]
        if length == 0:
            table[i, 0] = 1.0
            continue
        past = sigmas[i - torch.arange(h)].tolist()
        columns = [k for k in range(h) if past[k] not in past[:k]]
        nodes = (torch.tensor([past[k] for k in columns], dtype=torch.float64) - sigmas[i]) / length
        powers = torch.arange(len(columns), dtype=torch.float64)
        vandermonde = nodes.unsqueeze(0) ** powers.unsqueeze(1)
        table[i, columns] = torch.linalg.solve(vandermonde, 1.0 / (powers + 1))
    return table


@dataclass(frozen=True)
class Preset:
    """A classical multistep method: ``euler`` (= DDIM), ``ab2``-``ab4`` (variable-step
    Adams-Bashforth on the actual sigma grid) or ``ipndm`` (ComfyUI's fixed equal-step AB4 weights)."""

    name: str
    schedule = None  # presets work on whatever sigmas they are given
    row_sums = "one"

    def __post_init__(self) -> None:
        check_choice("preset", self.name, PRESET_NAMES)

    @property
    def order(self) -> int:
        return {"euler": 1, "ab2": 2, "ab3": 3, "ab4": 4, "ipndm": 4}[self.name]

    def weights(self, sigmas: torch.Tensor, sigma_to_timestep: SigmaToTimestep | None = None) -> torch.Tensor:
        steps = len(sigmas) - 1
        if self.name == "ipndm":
            table = torch.zeros(steps, self.order, dtype=torch.float64)
            for i, h in enumerate(history_lengths(steps, self.order).tolist()):
                table[i, :h] = torch.tensor(_IPNDM_WEIGHTS[h - 1], dtype=torch.float64)
            return table
        return adams_bashforth_weights(sigmas, self.order)


@dataclass(frozen=True)
class TableCoefficients:
    """Explicit weights per step count: ``tables[N]`` is the [N, order] table for an N-step run; rows sum to 1,
    or to learned step scales with ``row_sums="free"``."""

    tables: dict[int, torch.Tensor]
    order: int
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    schedule: StepSchedule | None = None
    row_sums: str = "one"

    def __post_init__(self) -> None:
        check_choice("row_sums", self.row_sums, ROW_SUMS)

    def weights(self, sigmas: torch.Tensor, sigma_to_timestep: SigmaToTimestep | None = None) -> torch.Tensor:
        steps = len(sigmas) - 1
        if steps not in self.tables:
            raise UntrainedStepCount("table", steps, self.tables)
        return self.tables[steps].to(torch.float64).clone()
