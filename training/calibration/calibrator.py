"""Forward-only calibration: fit a free-row-sum weight table and a schedule to one model from a few target runs.

The target is the final the user will render (a refine run; on the test beds the benchmark's 40-step
reference) from a few noises. Its recorded trajectory (state and denoised estimate at each of its sigmas)
does most of the work:

1. **Schedule search, free.** The preview's sigmas are picked among the target run's own, so the target state at
   every preview sigma is known. A schedule is scored without any model call by its local error
   (``local_error``): teacher-forced on the target's states and derivatives, how far the best weights of each
   step miss the target's next state. Warped spacings, then single-index moves, minimise it (as GITS searches a
   schedule by its local errors). This score ranks schedules by their held-out error; the calibration noises'
   own final error does not, because what dominates a few-step error on held-out noises (the few that land in
   another mode) is rarely among a few dozen calibration noises.
2. **Greedy least squares on the solver's own trajectory.** Step by step, with real model calls at the solver's
   own states, each step's weights are the linear fit that lands closest to the target's next state (its final
   after the last step), robust to the few noises that already landed in another mode (``robust_step_weights``:
   under plain least squares their misses, the size of the distance between modes, steer every noise's weights).
   Rows sum freely (a step scale), except the last: its weights sum to 1, so the preview ends fully denoised
   (``step_weights``; the schedule search and Gauss-Newton keep the same rule). One rollout per step count.
3. **Optionally (``end_to_end``), Gauss-Newton on the final error.** The final preview is a function of all
   weights and the log sigmas (the first stays at sigma_max). Its Jacobian is measured by forward finite
   differences: a weight of step i moves x_{i+1} along one cached derivative, a sigma moves where a step lands
   and where the model is asked, and the real model follows each change to the end (about N^2/2 calls per noise
   and weight order, on a few noises). A Levenberg-Marquardt step is verified by a real rollout on all
   calibration noises and kept only if it lowers the error of the noises it was not fitted on and raises no
   noise's error by more than 10 %; the rounds go on while the budget lasts.

Every model call runs under ``torch.no_grad``: nothing is ever back-propagated through the model, so memory is
that of inference. A model call is one denoiser evaluation of one latent (a CFG pair counts once, a batch of 64
latents counts 64); the budget counts all of them, the target runs included, and the first step of every
rollout reuses the target run's own first evaluation (the same state at sigma_max), which costs nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...solver import StepSchedule, TableCoefficients, to_d
from ...solver.coefficients import history_lengths, table_problem
from ...solver.schedules import schedule_positions

Model = Callable[..., Tensor]
# denoiser(x, sigma_vec, samples): row r of x belongs to calibration noise samples[r]
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
FD_RELATIVE = 1e-3  # finite-difference step of a weight: it moves the final by about this share of its norm
FD_LOG_SIGMA = 1e-3  # finite-difference step of a schedule sigma, in log sigma
DAMPING_TRIES = 3  # Gauss-Newton steps tried per Jacobian, each damped DAMPING_FACTOR times more
DAMPING_FACTOR = 30.0
SCHEDULE_WARPS = tuple(0.4 + 0.1 * k for k in range(17))  # index = last * (k / (N - 1)) ** warp, 0.4 to 2
NO_HARM = 1.1  # a Gauss-Newton step may raise no calibration noise's RMSE by more than this factor
MIN_IMPROVEMENT = 1e-3  # a candidate must lower the real RMSE by this share (not chase float noise)
# Each greedy step is an L^p fit over the calibration noises (robust_step_weights); 1.5 measured best of 1, 1.5, 2
# on the mixtures (1 gives up too much of the typical noises' fit).
ROBUST_POWER = 1.5
ROBUST_ITERATIONS = 5
# Raised whenever the fit changes what it makes, so a file calibrated before is fitted again, not reused (2: the last
# step's weights sum to 1; 3: the greedy steps are robust fits, robust_step_weights).
CALIBRATOR_REVISION = 3


class BudgetTooSmall(ValueError):
    """The model-call budget cannot pay for the request: the target runs (``target_calls``) plus one rollout of
    every step count on every noise; ``minimum`` is their sum."""

    def __init__(self, budget: int, target_calls: int, noises: int, steps: Sequence[int]):
        self.budget, self.target_calls, self.noises, self.steps = budget, target_calls, noises, tuple(steps)
        self.minimum = minimum_budget(target_calls, noises, steps)
        super().__init__(
            f"raise the budget to at least {self.minimum} model calls (it is {budget}), or use fewer noises, step "
            f"counts or target steps: the target runs take {target_calls} calls and one rollout of "
            f"{'+'.join(str(n) for n in self.steps)} steps on {noises} noises {self.minimum - target_calls}"
        )


@dataclass(frozen=True)
class TargetRun:
    """The recorded target run from the calibration noises: the final each preview should match.

    ``sigmas`` [R] are the run's nonzero sigmas, decreasing, starting at the model's sigma_max; ``states`` and
    ``denoised`` [R, M, ...] are the run's state x and the model's denoised estimate at each of them (what a
    ComfyUI sampler callback reports); ``finals`` [M, ...] is its result; ``model_calls`` what it cost.
    ``states[0]`` is where every preview starts, so it follows the sampler's own noise scaling (ComfyUI's
    ``model_sampling.noise_scaling``: at full denoise ``noise * sqrt(1 + sigma_0^2)`` for EPS, ``noise * sigma_0``
    for flow).
    """

    sigmas: Tensor
    states: Tensor
    denoised: Tensor
    finals: Tensor
    model_calls: int

    def __post_init__(self) -> None:
        count = len(self.sigmas)
        if self.states.shape[0] != count or self.denoised.shape[0] != count:
            raise ValueError(f"the target run records {count} sigmas but {len(self.states)} states")
        if count < 2 or not (self.sigmas[1:] < self.sigmas[:-1]).all() or not (self.sigmas > 0).all():
            raise ValueError("the target run's sigmas must be at least two positive, strictly decreasing values")

    @property
    def noises(self) -> int:
        return self.finals.shape[0]


def record_run(
    sampler: Callable[..., Tensor],
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    on_calls: Callable[[int], None] | None = None,
) -> TargetRun:
    """Run a k-diffusion style ``sampler(model, x, sigmas, extra_args=, callback=, disable=)`` (a ComfyUI stock
    sampler function or ``solver.sample_consistency_solver``) and record its trajectory as a TargetRun.

    ``x`` is the starting state at ``sigmas[0]`` (see TargetRun for the noise scaling); calls are counted per
    latent and reported to ``on_calls`` as in ``calibrate``. Runs without gradients, like every model call of
    the calibrator.
    """
    states, denoised, seen = [], [], []
    calls = 0

    def counted(state: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        nonlocal calls
        if on_calls is not None:
            on_calls(0)
        denoised = model(state, sigma, **kwargs)
        calls += state.shape[0]
        if on_calls is not None:
            on_calls(state.shape[0])
        return denoised

    def callback(info: dict[str, Any]) -> None:
        states.append(info["x"].detach().cpu())
        denoised.append(info["denoised"].detach().cpu())
        seen.append(float(info["sigma"]))

    with torch.no_grad():
        finals = sampler(counted, x, sigmas, extra_args=extra_args or {}, callback=callback, disable=True)
    return TargetRun(
        sigmas=torch.tensor(seen, dtype=torch.float64),
        states=torch.stack(states),
        denoised=torch.stack(denoised),
        finals=finals.detach().cpu(),
        model_calls=calls,
    )


@dataclass
class Calibration:
    """The fitted coefficients and what they cost: ``model_calls`` (targets included), ``seconds``, the
    Gauss-Newton ``rounds``, and per step count the final RMSE on the calibration noises after the greedy start and
    at the end."""

    coefficients: TableCoefficients
    model_calls: int
    seconds: float
    rounds: int
    fit_rmse: dict[int, tuple[float, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "method": "forward-only calibration: schedule by local error, greedy least squares"
            + (", Gauss-Newton on the final error" if self.rounds else ""),
            "model_calls": self.model_calls,
            "seconds": round(self.seconds, 1),
            "rounds": self.rounds,
            "fit_rmse": {str(n): [round(a, 5), round(b, 5)] for n, (a, b) in self.fit_rmse.items()},
        }


def jacobian_noise_count(noises: int) -> int:
    """How many of the calibration noises each Jacobian sweep uses: a sixth of them, 2 to 8 (the split measured
    best on Fashion; fewer let a Gauss-Newton step fit too few, more leave no budget for a second round)."""
    return min(8, max(2, noises // 6))


def local_error(target: TargetRun, indices: list[int], order: int) -> float:
    """How well a schedule on the target run's sigmas can follow it, at no model call: teacher-forced, each step
    starts on the target's state, weighs the target's own derivatives (the best weights, ``step_weights``) and misses
    the target's next state (its final after the last step) by some mean squared error; their sum.

    Steps too long for the model's curvature miss by much, and they are where a few-step preview lands in the
    wrong mode for some noises; so this sum ranks schedules by their held-out error far better than the
    calibration noises' own final error does (measured on the mixtures)."""
    sigmas = torch.cat([target.sigmas[indices].double(), torch.zeros(1, dtype=torch.float64)])
    history, total = [], 0.0
    for i, index in enumerate(indices):
        x = target.states[index].double()
        history = [to_d(x, sigmas[i], target.denoised[index].double()), *history[: order - 1]]
        wanted = target.finals if i + 1 == len(indices) else target.states[indices[i + 1]]
        columns = torch.stack([((sigmas[i + 1] - sigmas[i]) * d).flatten() for d in history], dim=1)
        gap = (wanted.double() - x).flatten()
        fitted = columns @ step_weights(columns, gap, last=i + 1 == len(indices))
        total += (fitted - gap).square().mean().item()
    return total


def step_weights(columns: Tensor, gap: Tensor, last: bool) -> Tensor:
    """The weights of one step: the blend of ``columns`` [elements, h] (each a derivative times the step) closest to
    ``gap`` [elements] by least squares, rows free to sum to any scale; but the last step's weights sum to 1.

    A preview is shown as a finished image, so its last step must remove all the noise left: with weights summing
    to 1 a step to sigma 0 on derivatives that agree lands on the clean image. Free, the least-squares optimum
    keeps a share of the last state's noise for the detail it carries (on Fashion 7 % of it at sigma 0.45), and
    the display clamp turns that noise on a black background into brightness the final does not have."""
    if not last:
        return torch.linalg.lstsq(columns, gap.unsqueeze(1)).solution.squeeze(1)
    if columns.shape[1] == 1:
        return columns.new_ones(1)
    first = columns[:, :1]
    rest = torch.linalg.lstsq(columns[:, 1:] - first, (gap - first.squeeze(1)).unsqueeze(1)).solution.squeeze(1)
    return torch.cat([1 - rest.sum(0, keepdim=True), rest])


def robust_step_weights(columns: Tensor, gap: Tensor, last: bool) -> Tensor:
    """``step_weights`` robust to outlying noises: ``columns`` [M, elements, h] and ``gap`` [M, elements] per
    calibration noise, the L^ROBUST_POWER fit over noises by iteratively reweighted least squares from the
    least-squares start (a noise's weight is its mean squared miss, relative to the noises' mean, to the power
    ROBUST_POWER / 2 - 1)."""
    scale = columns.new_ones(columns.shape[0], 1)
    for _ in range(ROBUST_ITERATIONS + 1):
        row = step_weights((columns * scale.unsqueeze(2)).flatten(0, 1), (gap * scale).flatten(), last)
        misses = (gap - columns @ row).square().mean(dim=1)
        if not misses.mean() > 0:
            break
        scale = ((misses / misses.mean()).clamp_min(1e-6) ** (ROBUST_POWER / 2 - 1)).sqrt().unsqueeze(1)
    return row


def searched_schedule(target: TargetRun, steps: int, order: int) -> list[int]:
    """The ``steps`` target-run sigmas (indices, the first at sigma_max) of least ``local_error``: the best of a
    family of warped spacings (index = last * (k / (steps - 1)) ** warp, for several last sigmas), then moved one
    index at a time while that lowers it. Costs no model call."""
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


def table_mask(steps: int, order: int) -> Tensor:
    """[steps, order] ones where a step has a derivative to weigh (min(i + 1, order) entries)."""
    mask = torch.zeros(steps, order, dtype=torch.bool)
    for i, h in enumerate(history_lengths(steps, order).tolist()):
        mask[i, :h] = True
    return mask


def greedy_cost(noises: int, steps: Sequence[int]) -> int:
    """Model calls of the start: one rollout of each step count (its first call is the target run's)."""
    return noises * sum(n - 1 for n in steps)


def minimum_budget(target_calls: int, noises: int, steps: Sequence[int]) -> int:
    """The least budget for a calibration: the target runs plus the greedy start (one rollout per step count)."""
    return target_calls + greedy_cost(noises, steps)


def check_budget(budget: int, target_calls: int, noises: int, steps: Sequence[int]) -> None:
    """Refuse (BudgetTooSmall) before any model call when ``budget`` cannot pay for the request."""
    if budget < minimum_budget(target_calls, noises, steps):
        raise BudgetTooSmall(budget, target_calls, noises, steps)


def check_target_sigmas(count: int, first: float, steps: Sequence[int], sigma_max: float) -> None:
    """Refuse a target run of ``count`` nonzero sigmas from ``first`` that the previews cannot be placed on: they
    start at the model's sigma_max and step through the target's own sigmas."""
    if max(steps) > count:
        raise ValueError(
            f"give the target run at least {max(steps)} steps: a {max(steps)}-step preview steps through its sigmas, "
            f"and it has {count}"
        )
    if abs(math.log(first / sigma_max)) > 1e-3:
        raise ValueError(
            f"start the target run at the model's sigma_max {sigma_max:.5g} (full denoise, a scheduler that starts "
            f"there): it starts at {first:.5g}, where previews from pure noise do not"
        )


def calibrate(
    denoiser: Denoiser,
    target: TargetRun,
    steps: Sequence[int],
    budget: int,
    *,
    sigma_min: float,
    sigma_max: float,
    order: int = 4,
    end_to_end: bool = False,
    jacobian_noises: int | None = None,
    on_calls: Callable[[int], None] | None = None,
) -> Calibration:
    """Fit a free-row-sum table and a schedule for every count in ``steps`` so that previews match the target.

    ``denoiser(x, sigma_vec, samples) -> denoised`` is the guided denoiser in ComfyUI's model space; row r of
    ``x`` belongs to calibration noise ``samples[r]`` (so a per-noise condition, such as a class label, can be
    looked up; batches repeat noises). ``sigma_min`` and ``sigma_max`` are the model's sigma range, where the
    stored schedule's positions are placed. With ``end_to_end`` the rest of the budget goes to Gauss-Newton
    rounds on the final error (``jacobian_noises`` noises per Jacobian sweep, default ``jacobian_noise_count``):
    they lower the calibration noises' error, and on Fashion the held-out 8-step error too, but on the mixtures
    they trade held-out noises that land in another mode for it, which the calibration noises do not show, so
    they are off by default. ``on_calls(n)`` is told of every batch of n model calls (n = 0: just before a call;
    it may raise to cancel). ``budget`` counts every call, ``target.model_calls`` included; too small a budget
    raises BudgetTooSmall before any call.
    """
    started = time.perf_counter()
    steps = sorted({int(n) for n in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"step counts must be positive, got {steps}")
    check_target_sigmas(len(target.sigmas), float(target.sigmas[0]), steps, sigma_max)
    check_budget(budget, target.model_calls, target.noises, steps)
    jacobian_noises = max(1, min(jacobian_noises or jacobian_noise_count(target.noises), target.noises))
    calls = target.model_calls

    def evaluate(state: Tensor, sigma: float, samples: Tensor) -> Tensor:
        """The real model on ``state``, whose rows belong to calibration noises ``samples``."""
        nonlocal calls
        if on_calls is not None:
            on_calls(0)
        with torch.no_grad():
            sigma_vec = torch.full((state.shape[0],), sigma, dtype=target.states.dtype)
            denoised = denoiser(state.to(target.states.dtype), sigma_vec, samples)
        calls += state.shape[0]
        if on_calls is not None:
            on_calls(state.shape[0])
        return denoised.double()

    grid = target.sigmas.double()
    fits = {n: _Fit(grid, searched_schedule(target, n, order), order, target, sigma_min) for n in steps}
    for fit in fits.values():
        fit.greedy_start(evaluate)

    def affordable(cost: int) -> bool:
        return calls + cost <= budget

    iterations = 0
    while end_to_end:
        ready = [fit for fit in fits.values() if affordable(fit.sweep_cost(jacobian_noises) + fit.rollout_cost())]
        if not ready:
            break
        for fit in ready:
            if affordable(fit.sweep_cost(jacobian_noises) + fit.rollout_cost()):
                fit.gauss_newton(evaluate, jacobian_noises, affordable)
        iterations += 1

    tables, positions = {}, {}
    for n, fit in fits.items():
        tables[n] = fit.weights
        problem = table_problem(tables[n], "free")
        if problem:
            raise ValueError(f"the calibrated {n}-step table is unusable: its rows {problem}")
        positions[n] = schedule_positions(fit.sigmas, sigma_min, sigma_max).clamp(0, 1)
        positions[n][0] = 0.0
    coefficients = TableCoefficients(tables=tables, order=order, schedule=StepSchedule(positions), row_sums="free")
    return Calibration(
        coefficients=coefficients,
        model_calls=calls,
        seconds=time.perf_counter() - started,
        rounds=iterations,
        fit_rmse={n: (fit.start_rmse, fit.best_rmse) for n, fit in fits.items()},
    )


def calibrate_model(
    model: Model,
    initial_states: Tensor,
    sigmas: Tensor,
    sampler: Callable[..., Tensor],
    steps: Sequence[int],
    budget: int,
    *,
    sigma_min: float,
    sigma_max: float,
    extra_args: dict[str, Any] | None = None,
    calls_per_step: int = 1,
    order: int = 4,
    end_to_end: bool = False,
    jacobian_noises: int | None = None,
    on_calls: Callable[[int], None] | None = None,
) -> Calibration:
    """Calibrate coefficients for any denoiser in ComfyUI's model space: the one call for a model that is neither a
    test bed nor a checkpoint.

    ``model(x, sigma_vec, **extra_args) -> denoised`` is the guided denoiser (conditions in ``extra_args``, the same
    for every noise; a CFG pair is one call). ``initial_states`` [M, ...] are the calibration noises scaled to
    ``sigmas[0]`` as the sampler starts: ComfyUI's ``model_sampling.noise_scaling(sigmas[0], noise, zeros,
    max_denoise=True)``, i.e. ``noise * sqrt(1 + sigma_0^2)`` for EPS/V models and ``noise * sigma_0`` for flow.
    ``sigmas`` (ending in 0, starting at ``sigma_max``) and ``sampler`` (k-diffusion contract, e.g.
    ``comfy.k_diffusion.sampling.sample_dpmpp_2m``) are the final render to match; it takes ``calls_per_step``
    model calls a step (2 for heun-like samplers). ``sigma_min``/``sigma_max`` are the model's range, where the
    calibrated schedule's positions are placed. The budget, counting every call with the target runs, is checked
    before any call (BudgetTooSmall names the minimum). Save the result with ``solver.save_coefficients(path,
    result.coefficients, model_family="<name>-eps" (or "-flow"), training=result.summary())``.
    """
    target_calls = initial_states.shape[0] * (len(sigmas) - 1) * calls_per_step
    check_budget(budget, target_calls, initial_states.shape[0], steps)
    check_target_sigmas(int((sigmas > 0).sum()), float(sigmas[0]), steps, sigma_max)
    extra_args = extra_args or {}
    target = record_run(sampler, model, initial_states, sigmas, extra_args, on_calls)
    return calibrate(
        lambda x, sigma, samples: model(x, sigma, **extra_args),
        target,
        steps,
        budget,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        order=order,
        end_to_end=end_to_end,
        jacobian_noises=jacobian_noises,
        on_calls=on_calls,
    )


class _Fit:
    """One step count's table and schedule: the greedy start on target-run sigmas, then damped Gauss-Newton on the
    final error over the weights and the log sigmas, with finite-difference Jacobians; every candidate is verified
    by a real rollout on all calibration noises and kept only if it improves."""

    def __init__(self, grid: Tensor, indices: list[int], order: int, target: TargetRun, sigma_min: float):
        self.indices, self.order, self.target, self.sigma_min = indices, order, target, sigma_min
        self.steps = len(indices)
        self.mask = table_mask(self.steps, order)
        self.start = target.states[0].double()
        self.finals = target.finals.double()
        self.all_samples = torch.arange(target.noises)
        self.sigmas = torch.cat([grid[indices], grid.new_zeros(1)])
        self.weights = torch.zeros(self.steps, order, dtype=torch.float64)
        self.best_rmse, self.start_rmse = math.inf, math.nan
        self.base: _Rollout | None = None  # the best verified rollout
        self.damping = 1e-3  # Levenberg-Marquardt damping, relative to the diagonal of J^T J
        self.rounds = 0

    @property
    def parameter_count(self) -> int:
        return int(self.mask.sum()) + self.steps - 1

    def parameter_basis(self) -> Tensor:
        """[parameters, free directions]: how Gauss-Newton may move the weights and log sigmas; the last step's
        weights only along directions that keep their sum at 1 (see ``step_weights``)."""
        last = int(self.mask[-1].sum())
        first = int(self.mask.sum()) - last  # where the last step's weights start
        basis = torch.eye(self.parameter_count, dtype=torch.float64)
        basis[first, first + 1 : first + last] = -1
        return torch.cat([basis[:, :first], basis[:, first + 1 :]], dim=1)

    def derivative(self, evaluate, x: Tensor, sigma: Tensor, samples: Tensor) -> Tensor:
        if sigma == self.sigmas[0]:  # the start state at sigma_max: the target run's own first evaluation
            return to_d(x, sigma, self.target.denoised[0].double()[samples])
        return to_d(x, sigma, evaluate(x, float(sigma), samples))

    def run(self, evaluate, rollout: _Rollout, first: int, x: Tensor, sigmas: Tensor, weights: Tensor, samples: Tensor):
        """Continue ``rollout`` (its derivatives before step ``first``) from state ``x`` at ``sigmas[first]``."""
        history = [d[samples] for d in rollout.derivatives[:first]][::-1][: self.order - 1] if rollout else []
        states, derivatives = [], []
        for i in range(first, self.steps):
            states.append(x)
            history = [self.derivative(evaluate, x, sigmas[i], samples), *history[: self.order - 1]]
            derivatives.append(history[0])
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(weights[i, k] * d for k, d in enumerate(history))
        return x, states, derivatives

    def greedy_start(self, evaluate) -> None:
        """Per step, the weights that best land on the target run's next state from the solver's own state (a robust
        linear fit in the step's weights, ``robust_step_weights``), rolled out with the real model: the start and
        first base rollout."""
        x, history, states, derivatives = self.start, [], [], []
        for i in range(self.steps):
            states.append(x)
            history = [self.derivative(evaluate, x, self.sigmas[i], self.all_samples), *history[: self.order - 1]]
            derivatives.append(history[0])
            step = self.sigmas[i + 1] - self.sigmas[i]
            wanted = self.finals if i + 1 == self.steps else self.target.states[self.indices[i + 1]].double()
            columns = torch.stack([(step * d).flatten(1) for d in history], dim=2)
            row = robust_step_weights(columns, (wanted - x).flatten(1), last=i + 1 == self.steps)
            self.weights[i, : len(history)] = row if row.sum() > 0 else torch.eye(1, len(history)).squeeze(0)
            x = x + step * sum(self.weights[i, k] * d for k, d in enumerate(history))
        self.accept(_Rollout(x, states, derivatives), self.weights, self.sigmas)
        self.start_rmse = self.best_rmse

    def accept(self, rollout: _Rollout, weights: Tensor, sigmas: Tensor, judged_on: Tensor | None = None) -> bool:
        """Keep a candidate whose real final error on the ``judged_on`` noises (default: all) beats the best's."""
        errors = (rollout.final - self.finals).flatten(1).square().mean(dim=1)
        if self.base is not None:
            judged_on = self.all_samples if judged_on is None else judged_on
            if errors[judged_on].mean() >= self.base.errors[judged_on].mean() * (1 - MIN_IMPROVEMENT) ** 2:
                return False
            if (errors > self.base.errors * NO_HARM**2).any():
                return False
        rollout.errors = errors
        self.best_rmse, self.base, self.weights, self.sigmas = errors.mean().sqrt().item(), rollout, weights, sigmas
        return True

    def jacobian(self, evaluate, samples: Tensor) -> Tensor:
        """d final / d parameter on ``samples``, [elements, parameters], by forward finite differences: a weight of
        step i moves x_{i+1} along one derivative, a log sigma moves where step i lands and the model is asked;
        the real model follows each change to the end."""
        base = self.base
        final = base.final[samples]
        scale = final.flatten(1).norm(dim=1).view(-1, *([1] * (final.dim() - 1)))
        columns = []
        for i, k in self.mask.nonzero().tolist():
            direction = (self.sigmas[i + 1] - self.sigmas[i]) * base.derivatives[i - k][samples]
            delta = FD_RELATIVE * scale / direction.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(scale)
            after = base.states[i + 1][samples] if i + 1 < self.steps else final
            moved, _, _ = self.run(evaluate, base, i + 1, after + delta * direction, self.sigmas, self.weights, samples)
            columns.append(((moved - final) / delta).flatten())
        for i in range(1, self.steps):
            sigmas = self.sigmas.clone()
            sigmas[i] = sigmas[i] * math.exp(FD_LOG_SIGMA)
            blended = (base.states[i][samples] - base.states[i - 1][samples]) / (self.sigmas[i] - self.sigmas[i - 1])
            landed = base.states[i - 1][samples] + (sigmas[i] - sigmas[i - 1]) * blended
            moved, _, _ = self.run(evaluate, base, i, landed, sigmas, self.weights, samples)
            columns.append(((moved - final) / FD_LOG_SIGMA).flatten())
        return torch.stack(columns, dim=1)

    def sweep_cost(self, jacobian_noises: int) -> int:
        lengths = history_lengths(self.steps, self.order).tolist()
        columns = sum(h * (self.steps - 1 - i) for i, h in enumerate(lengths)) + sum(range(1, self.steps))
        return jacobian_noises * columns

    def rollout_cost(self) -> int:
        return len(self.all_samples) * (self.steps - 1)

    def gauss_newton(self, evaluate, jacobian_noises: int, affordable: Callable[[int], bool]) -> None:
        """One Jacobian from ``jacobian_noises`` noises (a different window each round), then damped Gauss-Newton
        steps of growing damping (up to DAMPING_TRIES, while the budget lasts) until one improves the real final
        error on the other noises: those the step was not fitted on judge it, so it does not overfit the few."""
        count = len(self.all_samples)
        window = (self.rounds * jacobian_noises + torch.arange(jacobian_noises)) % count
        samples = self.all_samples[window]
        others = self.all_samples[~torch.isin(self.all_samples, samples)]
        judged_on = others if len(others) else self.all_samples
        self.rounds += 1
        basis = self.parameter_basis()
        jacobian = self.jacobian(evaluate, samples) @ basis
        residual = (self.base.final[samples] - self.finals[samples]).flatten()
        normal, gradient = jacobian.T @ jacobian, jacobian.T @ residual
        scale = torch.diag(normal.diagonal().clamp_min(1e-30))
        weight_count = int(self.mask.sum())
        for _ in range(DAMPING_TRIES):
            update = -basis @ torch.linalg.solve(normal + self.damping * scale, gradient)
            weights = self.weights.clone()
            weights[self.mask] += update[:weight_count]
            sigmas = self.sigmas.clone()
            sigmas[1:-1] = (sigmas[1:-1] * update[weight_count:].exp()).clamp_min(self.sigma_min)
            if bool((sigmas[1:-1] < sigmas[:-2]).all()) and (weights.sum(dim=1) > 0).all():
                if not affordable(self.rollout_cost()):
                    return
                rollout = _Rollout(*self.run(evaluate, None, 0, self.start, sigmas, weights, self.all_samples))
                if self.accept(rollout, weights, sigmas, judged_on):
                    self.damping = max(self.damping / DAMPING_FACTOR, 1e-6)
                    return
            self.damping *= DAMPING_FACTOR


@dataclass
class _Rollout:
    """A real rollout: its final, and the state and derivative at every step."""

    final: Tensor
    states: list[Tensor]
    derivatives: list[Tensor]
    errors: Tensor | None = None  # per noise, the final's mean squared error (set when it is accepted)
