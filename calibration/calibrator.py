"""Forward-only calibration with its guard: fit on some noises, judge every candidate on the others, keep the best.

The budget of model calls is the one knob: it buys the noises (``plan_noises``), each rendered once by the refine,
most of them fitted on (one greedy rollout per step count), the rest held out to validate the fit against the
pack's default and the stock samplers (``guard.validate``). Nothing is back-propagated through the model; a model
call is one latent through the guided model (a CFG pair counts once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..solver import (
    CoefficientSource,
    StepSchedule,
    TableCoefficients,
    UntrainedStepCount,
    coefficient_table,
    equivalent_table,
)
from ..solver.coefficients import table_problem
from ..solver.schedules import schedule_positions
from .fit import ORDER, greedy_fit, searched_schedule
from .guard import CALIBRATED, DEFAULT, STOCK, Candidate, Validation, validate, validation_cost
from .target import OnCalls, TargetRun

# Raised whenever the fit changes what it makes, so a file calibrated before is fitted again, not reused (4: the
# guard, held-out noises and the budget as the one knob).
CALIBRATOR_REVISION = 4
# The stock choices the guard races the fit against: ComfyUI's linear multistep samplers (every one that
# solver.equivalent_table reproduces), on the schedulers that suit the model family (the bundled default, on its
# learned schedule, races too).
CANDIDATE_SAMPLERS = ("euler", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2", "res_multistep")
CANDIDATE_SCHEDULERS = {"eps": ("karras", "simple", "beta"), "flow": ("simple", "beta", "normal")}
# How the noises are shared: a dozen fit noises fit as well as three dozen (measured on Fashion), while the held-out
# ones decide between candidates whose RMSE may differ by a few percent.
MIN_HELD_OUT, HELD_OUT_SHARE = 4, 0.4
MIN_FIT = 2
SEARCHED = "searched"  # the schedule the fit searches on the refine's sigmas by local error
SCHEDULE_FINALISTS = 2  # fitted schedules that go on to the race, the best by their fit noises' final error
SCREEN_FIT_NOISES = 4  # fit noises every schedule is screened on


class BudgetTooSmall(ValueError):
    """The budget cannot pay for the smallest calibration: ``minimum`` model calls."""

    def __init__(self, budget: int, minimum: int):
        self.budget, self.minimum = budget, minimum
        super().__init__(f"raise the budget to at least {minimum} model calls (it is {budget})")


@dataclass(frozen=True)
class NoisePlan:
    """How many noises the budget buys: ``fit`` to fit on, ``held_out`` to validate on, and what they cost."""

    fit: int
    held_out: int
    model_calls: int

    @property
    def noises(self) -> int:
        return self.fit + self.held_out


def plan_cost(
    fit: int, held_out: int, refine_calls: int, steps: Sequence[int], shapes: dict[int, int], race: int
) -> int:
    """Model calls of a calibration: the refine of every noise; per step count, ``shapes[n]`` schedules screened by a
    greedy rollout on SCREEN_FIT_NOISES fit noises and the best SCHEDULE_FINALISTS fitted on all of them; the race
    of ``race`` candidates on the held-out noises (a rollout of N steps costs N - 1 calls)."""
    screen = min(SCREEN_FIT_NOISES, fit)
    fitting = sum((n - 1) * (shapes[n] * screen + min(SCHEDULE_FINALISTS, shapes[n]) * fit) for n in steps)
    return (fit + held_out) * refine_calls + fitting + validation_cost(race, held_out, list(steps))


def plan_noises(
    budget: int, refine_calls: int, steps: Sequence[int], candidates: Sequence[Candidate], grid: Tensor
) -> NoisePlan:
    """The most noises ``budget`` pays for, HELD_OUT_SHARE of them (at least MIN_HELD_OUT) held out; BudgetTooSmall
    when it cannot pay for MIN_FIT + MIN_HELD_OUT. ``refine_calls`` is one refine run's calls per noise, ``grid`` its
    sigmas, ``candidates`` what the fit races (their schedules are tried by the fit too)."""
    tried = schedules_to_fit(grid, steps, candidates)
    shapes = {n: 1 + len(tried[n]) for n in steps}  # the searched schedule, and the candidates' own
    race = len(candidates) + SCHEDULE_FINALISTS

    def cost(noises: int) -> int:
        held_out = max(MIN_HELD_OUT, round(HELD_OUT_SHARE * noises))
        return plan_cost(noises - held_out, held_out, refine_calls, steps, shapes, race)

    smallest = MIN_FIT + MIN_HELD_OUT
    if budget < cost(smallest):
        raise BudgetTooSmall(budget, cost(smallest))
    noises = smallest
    while cost(noises + 1) <= budget:
        noises += 1
    held_out = max(MIN_HELD_OUT, round(HELD_OUT_SHARE * noises))
    return NoisePlan(noises - held_out, held_out, cost(noises))


def snapped(grid: Tensor, sigmas: Tensor) -> list[int]:
    """The refine sigmas (indices into ``grid``, its nonzero sigmas) nearest in log sigma to a schedule's nonzero
    ``sigmas``; where two land on one, the later moves on to the next (or, at the end of the grid, the earlier back),
    so the schedule keeps its steps when the grid has room."""
    logs = grid.double().log()
    indices = [int((logs - s.log()).abs().argmin()) for s in sigmas.double()[sigmas > 0]]
    for i in range(1, len(indices)):
        indices[i] = max(indices[i], indices[i - 1] + 1)
    last = len(grid) - 1
    for i in reversed(range(len(indices))):
        indices[i] = min(indices[i], last - (len(indices) - 1 - i))
    return indices if len(set(indices)) == len(indices) and indices[0] >= 0 else []


def schedules_to_fit(grid: Tensor, steps: Sequence[int], candidates: Sequence[Candidate]) -> dict[int, dict[str, list]]:
    """Per step count, the schedules the fit tries besides the one it searches: the candidates' own (by schedule
    name), placed on the refine's sigmas ``grid``, where they keep all their steps, each once."""
    tried: dict[int, dict[str, list]] = {}
    for n in steps:
        tried[n] = {}
        for candidate in candidates:
            if n in candidate.sigmas and candidate.schedule and candidate.schedule not in tried[n]:
                indices = snapped(grid, candidate.sigmas[n])
                if len(indices) == n and indices and indices[0] == 0 and indices not in tried[n].values():
                    tried[n][candidate.schedule] = indices
    return tried


def source_candidate(
    label: str,
    kind: str,
    source: CoefficientSource,
    sigmas: Callable[[int], Tensor],
    steps: Sequence[int],
    model_sampling: Any = None,
    schedule: str = "",
) -> Candidate:
    """A coefficient source (the pack's default, a preset) as a candidate on ``sigmas(n)`` (the ``schedule``) for each
    count it holds."""
    runs, tables = {}, {}
    for n in steps:
        try:
            runs[n] = sigmas(n).double()
            tables[n] = coefficient_table(source, runs[n], model_sampling)
        except UntrainedStepCount:
            runs.pop(n, None)
    return Candidate(label, kind, runs, tables, schedule)


def stock_candidate(
    label: str, sampler: Callable[..., Tensor], sigmas: Callable[[int], Tensor], steps: Sequence[int], schedule: str
) -> Candidate:
    """A stock linear multistep sampler (k-diffusion contract) as the weight table that reproduces it on ``sigmas(n)``
    (the ``schedule``; ``solver.equivalent_table``, no model call); NotLinearMultistep for a sampler outside the
    family."""
    runs = {n: sigmas(n).double() for n in steps}
    return Candidate(label, STOCK, runs, {n: equivalent_table(sampler, runs[n]) for n in steps}, schedule)


@dataclass(frozen=True)
class Calibration:
    """What a calibration made and measured: the coefficients (per step count the winner's table on its schedule),
    the validation race, the winners' kinds, the noise plan and what it cost."""

    coefficients: TableCoefficients
    validation: Validation
    kinds: dict[str, str]
    plan: NoisePlan
    model_calls: int
    seconds: float

    def best_of(self, n: int, kind: str) -> tuple[str, float] | None:
        """The label and held-out RMSE of the best candidate of ``kind`` at ``n`` steps, or None."""
        rmse = self.validation.rmse[n]
        labels = [label for label in rmse if self.kinds[label] == kind and label not in self.validation.screened_out[n]]
        labels = labels or [label for label in rmse if self.kinds[label] == kind]
        if not labels:
            return None
        best = min(labels, key=rmse.get)
        return best, rmse[best]

    def not_monotone(self) -> list[str]:
        """Where a step count's preview measured worse than a smaller count's: the counts and their RMSE."""
        problems, counts = [], sorted(self.validation.winners)
        for smaller, larger in zip(counts, counts[1:], strict=False):
            low = self.validation.rmse[smaller][self.validation.winners[smaller]]
            high = self.validation.rmse[larger][self.validation.winners[larger]]
            if high > low:
                problems.append(f"{larger} steps measured worse than {smaller} ({high:.4g} vs {low:.4g})")
        return problems

    def summary(self) -> dict[str, Any]:
        """The file's ``training`` metadata: method, plan, cost, and the validation table with its winners."""
        return {
            "method": "forward-only calibration: schedule by local error, greedy least squares, and a guard that "
            "keeps the candidate of least RMSE on held-out noises",
            "noises": {"fit": self.plan.fit, "held_out": self.plan.held_out},
            "model_calls": self.model_calls,
            "seconds": round(self.seconds, 1),
            "winners": {str(n): label for n, label in self.validation.winners.items()},
            "validation": {
                str(n): {label: round(value, 6) for label, value in rmse.items()}
                for n, rmse in self.validation.rmse.items()
            },
            "kinds": self.kinds,
            "not_monotone": self.not_monotone(),
        }

    def report(self) -> str:
        """A short table for the artist: per step count, what the file uses and how it measured on held-out noises,
        as ratios to the best stock sampler and to the pack's default."""
        lines = [
            f"Judged on {self.plan.held_out} held-out noises (fitted on {self.plan.fit}; {self.model_calls} model "
            "calls). RMSE to the refine; lower is better.",
            "steps | uses | RMSE | x best stock | x default",
        ]
        for n, winner in sorted(self.validation.winners.items()):
            rmse = self.validation.rmse[n][winner]
            stock, default = self.best_of(n, STOCK), self.best_of(n, DEFAULT)
            versus_stock = f"{rmse / stock[1]:.2f}x ({stock[0]})" if stock else "-"
            versus_default = f"{rmse / default[1]:.2f}x" if default else "-"
            uses = winner if self.kinds[winner] == CALIBRATED else f"{winner} (measured best: {self.kinds[winner]})"
            lines.append(f"{n} | {uses} | {rmse:.4g} | {versus_stock} | {versus_default}")
        for n, winner in sorted(self.validation.winners.items()):
            if self.kinds[winner] != CALIBRATED:
                lines.append(f"At {n} steps the fit lost: the file uses {winner}'s weights and schedule.")
        lines += [f"Note: {problem}." for problem in self.not_monotone()]
        return "\n".join(lines)


def calibrate(
    denoiser: Callable[[Tensor, Tensor, Tensor], Tensor],
    target: TargetRun,
    plan: NoisePlan,
    steps: Sequence[int],
    candidates: Sequence[Candidate],
    *,
    sigma_min: float,
    sigma_max: float,
    on_calls: OnCalls | None = None,
) -> Calibration:
    """Fit ``steps`` on the first ``plan.fit`` noises of the recorded refine ``target``, race the fit and
    ``candidates`` on the other ``plan.held_out``, and keep per step count the measured best.

    ``denoiser(x, sigma, samples) -> denoised`` is the guided model in ComfyUI's model space; row r of ``x`` belongs
    to calibration noise ``samples[r]`` (so a per-noise condition, a prompt or a class, can be looked up).
    ``sigma_min`` / ``sigma_max`` are the model's range, where the file's schedules are placed. ``on_calls(n)`` is
    told of every n model calls (n = 0 just before a call; it may raise to cancel).
    """
    started = time.perf_counter()
    steps = sorted(set(steps))
    if target.noises != plan.noises:
        raise ValueError(f"the plan has {plan.noises} noises and the refine ran {target.noises}")
    calls = target.model_calls

    def counted(x: Tensor, sigma: float, samples: Tensor) -> Tensor:
        nonlocal calls
        if on_calls is not None:
            on_calls(0)
        with torch.no_grad():
            sigma_vec = torch.full((x.shape[0],), sigma, dtype=target.states.dtype)
            denoised = denoiser(x.to(target.states.dtype), sigma_vec, samples).double()
        calls += x.shape[0]
        if on_calls is not None:
            on_calls(x.shape[0])
        return denoised

    fit_samples, held_out = torch.arange(plan.fit), torch.arange(plan.fit, plan.noises)
    fit_target = target.subset(fit_samples)  # the schedule search sees no held-out noise
    tried = schedules_to_fit(target.sigmas, steps, candidates)
    fitted = []
    for n in steps:
        schedules = {SEARCHED: searched_schedule(fit_target, n)}
        schedules |= {name: indices for name, indices in tried[n].items() if indices not in schedules.values()}
        # The greedy fit does not aim at the final error, so its error on a few fit noises ranks schedules fairly
        # (measured on Fashion: 4 noises rank as 17 do, and pick the schedule of least held-out error where the
        # local error does not); the best are then fitted on all of them.
        screen = fit_samples[:SCREEN_FIT_NOISES]
        screened = {name: greedy_fit(counted, target, screen, indices) for name, indices in schedules.items()}
        ranked = sorted(
            screened, key=lambda name: float((screened[name].final - target.finals[screen]).square().mean())
        )
        for name in ranked[:SCHEDULE_FINALISTS]:
            fit = greedy_fit(counted, target, fit_samples, schedules[name])
            label = f"{CALIBRATED} ({name} schedule)"
            fitted.append(Candidate(label, CALIBRATED, {n: fit.sigmas}, {n: fit.weights}, name))
    everyone = [*fitted, *candidates]
    validation = validate(counted, target, held_out, everyone, steps)
    chosen = {(c.label, n): c for c in everyone for n in c.tables}
    tables, positions = {}, {}
    order = max(ORDER, *(chosen[label, n].tables[n].shape[1] for n, label in validation.winners.items()))
    for n, label in validation.winners.items():
        table = chosen[label, n].tables[n]
        tables[n] = torch.nn.functional.pad(table, (0, order - table.shape[1]))
        problem = table_problem(tables[n], "free")
        if problem:
            raise ValueError(f"the {n}-step table of {label} is unusable: its rows {problem}")
        positions[n] = schedule_positions(chosen[label, n].sigmas[n], sigma_min, sigma_max).clamp(0, 1)
        positions[n][0] = 0.0
    coefficients = TableCoefficients(tables=tables, order=order, schedule=StepSchedule(positions), row_sums="free")
    return Calibration(
        coefficients=coefficients,
        validation=validation,
        kinds={c.label: c.kind for c in everyone},
        plan=plan,
        model_calls=calls,
        seconds=time.perf_counter() - started,
    )
