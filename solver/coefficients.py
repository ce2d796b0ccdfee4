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


def row_sums_problem(table: torch.Tensor, row_sums: str) -> str | None:
    """What is wrong with the row sums of a [steps, order] table under ``row_sums`` (see ROW_SUMS), or None."""
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
    """
    sigmas = sigmas.detach().to("cpu", torch.float64)
    steps = len(sigmas) - 1
    table = torch.zeros(steps, order, dtype=torch.float64)
    for i, h in enumerate(history_lengths(steps, order).tolist()):
        nodes = (sigmas[i - torch.arange(h)] - sigmas[i]) / (sigmas[i + 1] - sigmas[i])
        powers = torch.arange(h, dtype=torch.float64)
        vandermonde = nodes.unsqueeze(0) ** powers.unsqueeze(1)
        table[i, :h] = torch.linalg.solve(vandermonde, 1.0 / (powers + 1))
    return table


@dataclass(frozen=True)
class Preset:
    """A classical multistep method: ``euler`` (= DDIM), ``ab2``-``ab4`` (variable-step
    Adams-Bashforth on the actual sigma grid) or ``ipndm`` (ComfyUI's fixed equal-step AB4 weights)."""

    name: str
    schedule = None  # presets work on whatever sigmas they are given
    row_sums = "one"

    def __post_init__(self) -> None:
        if self.name not in PRESET_NAMES:
            raise ValueError(f"unknown preset {self.name!r}; presets: {', '.join(PRESET_NAMES)}")

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
        if self.row_sums not in ROW_SUMS:
            raise ValueError(f"unknown row_sums {self.row_sums!r}; choose one of {', '.join(ROW_SUMS)}")

    def weights(self, sigmas: torch.Tensor, sigma_to_timestep: SigmaToTimestep | None = None) -> torch.Tensor:
        steps = len(sigmas) - 1
        if steps not in self.tables:
            known = ", ".join(str(n) for n in sorted(self.tables))
            raise ValueError(
                f"this coefficient table has no weights for {steps} steps (it has {known}); "
                "sample with one of those step counts, train a table that includes it, or use a preset"
            )
        return self.tables[steps].to(torch.float64).clone()
