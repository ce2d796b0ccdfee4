"""Fitting a preview's weights and schedule to the recorded refine, forward-only.

1. **Schedule search, free.** A preview's sigmas are picked among the refine's own, so the refine's state at every
   preview sigma is known. A schedule is scored without any model call by its local error (``local_error``):
   teacher-forced on the refine's states and derivatives, how far the best weights of each step miss the refine's
   next state. Warped spacings, then single-index moves, minimise it (as GITS searches a schedule).
2. **Greedy least squares on the solver's own trajectory.** Step by step, with real model calls at the solver's own
   states, each step's weights are the linear fit that lands closest to the refine's next state (its final after
   the last step), robust to the few noises that already landed in another mode (``robust_step_weights``). Rows sum
   freely (a step scale), except the last: its weights sum to 1, so the preview ends fully denoised.

Every model call runs under ``torch.no_grad``; the first step of every rollout reuses the refine's own first
evaluation (the same state at sigma_max), which costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..solver import to_d
from ..solver.sampling import multistep_update, remember
from .target import TargetRun

# evaluate(x, sigma, samples): the model at one sigma (a number) on rows of x that belong to calibration noises
# ``samples``, in float64 (``calibrate`` makes one from the caller's denoiser, counting its calls)
Evaluate = Callable[[Tensor, float, Tensor], Tensor]
Rows = Callable[[int, Tensor, list[Tensor]], Tensor]  # (step, state, history) -> the step's weights
ORDER = 4  # weights per step: the newest derivative and three before it
SCHEDULE_WARPS = tuple(0.4 + 0.1 * k for k in range(17))  # index = last * (k / (N - 1)) ** warp, 0.4 to 2
# Each greedy step is an L^p fit over the calibration noises; 1.5 measured best of 1, 1.5, 2 on the mixtures (1 gives
# up too much of the typical noises' fit).
ROBUST_POWER = 1.5
ROBUST_ITERATIONS = 5


def step_weights(columns: Tensor, gap: Tensor, last: bool) -> Tensor:
    """The weights of one step: the blend of ``columns`` [elements, h] (each a derivative times the step) closest to
    ``gap`` [elements] by least squares, free to sum to any scale; but the last step's weights sum to 1.

    A preview is shown as a finished image, so its last step must remove all the noise left: with weights summing
    to 1 a step to sigma 0 on derivatives that agree lands on the clean image. Free, the optimum keeps a share of the
    last state's noise for the detail it carries (on Fashion 7 % of it at sigma 0.45), which the display clamp turns
    into brightness on a black background that the final does not have."""
    if not last:
        return torch.linalg.lstsq(columns, gap.unsqueeze(1)).solution.squeeze(1)
    if columns.shape[1] == 1:
        return columns.new_ones(1)
    first = columns[:, :1]
    rest = torch.linalg.lstsq(columns[:, 1:] - first, (gap - first.squeeze(1)).unsqueeze(1)).solution.squeeze(1)
    return torch.cat([1 - rest.sum(0, keepdim=True), rest])


def robust_step_weights(columns: Tensor, gap: Tensor, last: bool) -> Tensor:
    """``step_weights`` robust to outlying noises: ``columns`` [M, elements, h] and ``gap`` [M, elements] per noise,
    the L^ROBUST_POWER fit over noises by iteratively reweighted least squares from the least-squares start.

    A noise whose rollout already landed in another mode misses by the distance between modes; under plain least
    squares it steers every noise's weights toward rescuing it, which a multistep step cannot."""
    scale = columns.new_ones(columns.shape[0], 1)
    for _ in range(ROBUST_ITERATIONS + 1):
        row = step_weights((columns * scale.unsqueeze(2)).flatten(0, 1), (gap * scale).flatten(), last)
        misses = (gap - columns @ row).square().mean(dim=1)
        if not misses.mean() > 0:
            break
        scale = ((misses / misses.mean()).clamp_min(1e-6) ** (ROBUST_POWER / 2 - 1)).sqrt().unsqueeze(1)
    return row


def local_error(target: TargetRun, indices: list[int], order: int = ORDER) -> float:
    """How well a schedule on the refine's sigmas can follow it, at no model call: teacher-forced, each step starts on
    the refine's state, weighs the refine's own derivatives with the best weights (``step_weights``) and misses the
    refine's next state (its final after the last step) by some mean squared error; their sum.

    Steps too long for the model's curvature miss by much, and they are where a few-step preview lands in the wrong
    mode for some noises; so this ranks schedules by their held-out error far better than the calibration noises'
    own final error does (measured on the mixtures)."""
    sigmas = torch.cat([target.sigmas[indices].double(), torch.zeros(1, dtype=torch.float64)])
    history, total = [], 0.0
    for i, index in enumerate(indices):
        x = target.states[index].double()
        history = remember(history, to_d(x, sigmas[i], target.denoised[index].double()), order)
        wanted = target.finals if i + 1 == len(indices) else target.states[indices[i + 1]]
        columns = torch.stack([((sigmas[i + 1] - sigmas[i]) * d).flatten() for d in history], dim=1)
        gap = (wanted.double() - x).flatten()
        fitted = columns @ step_weights(columns, gap, last=i + 1 == len(indices))
        total += (fitted - gap).square().mean().item()
    return total


def searched_schedule(target: TargetRun, steps: int, order: int = ORDER) -> list[int]:
    """The ``steps`` refine sigmas (indices, the first at sigma_max) of least ``local_error``: the best of a family of
    warped spacings (index = last * (k / (steps - 1)) ** warp, for several last sigmas), then moved one index at a
    time while that lowers it. Costs no model call."""
    count = len(target.sigmas)
    if steps == 1:
        return [0]
    candidates = []
    for last in range(max(steps - 1, count * (steps - 1) // steps - 1), count):
        for warp in SCHEDULE_WARPS:
            indices = [round(last * (k / (steps - 1)) ** warp) for k in range(steps)]
            if len(set(indices)) == steps and indices not in candidates:
                candidates.append(indices)
    errors = {tuple(indices): local_error(target, indices, order) for indices in candidates}
    best = list(min(errors, key=errors.get))
    improved = True
    while improved:
        improved = False
        for i in range(1, steps):
            for move in (-1, 1):
                moved = best.copy()
                moved[i] += move
                if moved[i] <= moved[i - 1] or (i + 1 < steps and moved[i] >= moved[i + 1]) or moved[i] >= count:
                    continue
                key = tuple(moved)
                if key not in errors:
                    errors[key] = local_error(target, moved, order)
                if errors[key] < errors[tuple(best)]:
                    best, improved = moved, True
    return best


@torch.no_grad()
def rollout(evaluate: Evaluate, target: TargetRun, samples: Tensor, sigmas: Tensor, rows: Rows, order: int) -> Tensor:
    """The preview of calibration noises ``samples`` on ``sigmas`` (from the refine's sigma_max to 0), each step's
    weights given by ``rows``; the first derivative is the refine's own (same state, same sigma)."""
    if abs(float(sigmas[0]) / float(target.sigmas[0]) - 1) > 1e-6:
        raise ValueError(f"a preview starts at the refine's first sigma {float(target.sigmas[0]):.5g}")
    x, history = target.states[0][samples].double(), []
    for i in range(len(sigmas) - 1):
        denoised = target.denoised[0][samples].double() if i == 0 else evaluate(x, float(sigmas[i]), samples)
        history = remember(history, to_d(x, sigmas[i], denoised), order)
        x = multistep_update(x, sigmas[i], sigmas[i + 1], rows(i, x, history), history)
    return x


@dataclass(frozen=True)
class Fit:
    """One step count's fitted weights [steps, ORDER] and sigmas (steps + 1, ending in 0), with the preview the fit
    made of the calibration noises (``final``)."""

    weights: Tensor
    sigmas: Tensor
    final: Tensor


def greedy_fit(evaluate: Evaluate, target: TargetRun, samples: Tensor, indices: list[int], order: int = ORDER) -> Fit:
    """Per step, the weights that best land on the refine's next state from the solver's own state (a robust linear
    fit, ``robust_step_weights``), rolled out with the real model on calibration noises ``samples``."""
    steps = len(indices)
    sigmas = torch.cat([target.sigmas[indices].double(), torch.zeros(1, dtype=torch.float64)])
    weights = torch.zeros(steps, order, dtype=torch.float64)
    finals = target.finals[samples].double()

    def fitted(i: int, x: Tensor, history: list[Tensor]) -> Tensor:
        step = sigmas[i + 1] - sigmas[i]
        wanted = finals if i + 1 == steps else target.states[indices[i + 1]][samples].double()
        columns = torch.stack([(step * d).flatten(1) for d in history], dim=2)
        row = robust_step_weights(columns, (wanted - x).flatten(1), last=i + 1 == steps)
        weights[i, : len(history)] = row if row.sum() > 0 else torch.eye(1, len(history)).squeeze(0)
        return weights[i]

    final = rollout(evaluate, target, samples, sigmas, fitted, order)
    return Fit(weights, sigmas, final)
