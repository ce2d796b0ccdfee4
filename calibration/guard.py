"""The guard: every candidate preview is rolled out on held-out noises and the measured best is kept.

The calibration noises fit the weights; the held-out ones, which the fit never saw, judge them against the choices
an artist has anyway: the pack's default on its learned schedule and the stock linear samplers (as their weight
tables, ``solver.equivalent_table``) on the stock schedules. Rolling every candidate out on every held-out noise
costs too much, so the candidates race: all of them on the first few held-out noises, then only the best few (the
calibrated fits and the default always among them) on the rest, and the winner is the lowest RMSE over them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .fit import Evaluate, rollout
from .target import TargetRun

SCREEN_NOISES = 2  # held-out noises every candidate is rolled out on
FINALISTS = 6  # candidates that go on to every held-out noise (the calibrated fits and the default among them)
CALIBRATED, DEFAULT, STOCK = "calibrated", "default", "stock"


@dataclass(frozen=True)
class Candidate:
    """A preview the guard can choose: per step count, its sigmas (steps + 1, in the model's range, from its
    sigma_max to 0) and weight table [steps, order]. ``kind`` is CALIBRATED, DEFAULT or STOCK; ``schedule`` names
    its sigmas (a scheduler, ``learned``), which the fit tries too."""

    label: str
    kind: str
    sigmas: dict[int, Tensor]
    tables: dict[int, Tensor]
    schedule: str = ""


@dataclass(frozen=True)
class Validation:
    """Per step count and candidate label, the held-out RMSE to the refine (on ``SCREEN_NOISES`` noises for the
    candidates that did not go on, marked in ``screened_out``), and the winner of each count."""

    rmse: dict[int, dict[str, float]]
    screened_out: dict[int, set[str]]
    winners: dict[int, str]
    noises: int


def validation_cost(candidates: int, held_out: int, step_counts: list[int]) -> int:
    """Model calls of ``validate``: every candidate's rollouts on the screening noises, the finalists' on the rest
    (a rollout of N steps costs N - 1 calls)."""
    screen = min(SCREEN_NOISES, held_out)
    finalists = min(FINALISTS, candidates)
    return sum((n - 1) * (screen * candidates + (held_out - screen) * finalists) for n in step_counts)


def validate(
    evaluate: Evaluate, target: TargetRun, samples: Tensor, candidates: list[Candidate], steps: list[int]
) -> Validation:
    """Race ``candidates`` on held-out noises ``samples`` of the refine ``target`` at every count in ``steps``."""
    screen, rest = samples[:SCREEN_NOISES], samples[SCREEN_NOISES:]
    rmse, screened_out, winners = {}, {}, {}
    for n in steps:
        entered = [c for c in candidates if n in c.tables]
        errors = {c.label: squared_errors(evaluate, target, screen, c.sigmas[n], c.tables[n]) for c in entered}
        ranked = sorted(entered, key=lambda c: (c.kind == STOCK, float(errors[c.label].mean())))
        finalists = ranked[:FINALISTS]
        if len(rest):
            for c in finalists:
                more = squared_errors(evaluate, target, rest, c.sigmas[n], c.tables[n])
                errors[c.label] = torch.cat([errors[c.label], more])
        rmse[n] = {label: float(e.mean().sqrt()) for label, e in errors.items()}
        screened_out[n] = {c.label for c in entered if c not in finalists} if len(rest) else set()
        winners[n] = min((c.label for c in finalists), key=lambda label: rmse[n][label])
    return Validation(rmse, screened_out, winners, len(samples))


def squared_errors(evaluate: Evaluate, target: TargetRun, samples: Tensor, sigmas: Tensor, table: Tensor) -> Tensor:
    """Per held-out noise, the mean squared error of the preview (``table`` on ``sigmas``) to the refine's final."""
    order = table.shape[1]
    preview = rollout(evaluate, target, samples, sigmas.double(), lambda i, x, history: table[i], order)
    return (preview - target.finals[samples].double()).flatten(1).square().mean(dim=1)
