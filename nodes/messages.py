"""Problems worded for the node the user meets them in.

The solver and the resolver raise problems as data (``solver.errors``, ``CoefficientFileError``,
``WrongModelFamily``, ``NoLearnedSchedule``); the runtime adds what the user set for the run (``RunProblem``,
no wording); here, at the node, they become one message that starts with what to change, names the node (or,
picked by name in a stock node, the sampler or scheduler) and the file, and offers only what that node has.
Pure Python: tested without ComfyUI.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..solver import CoefficientFileError, CoefficientSource, InvalidWeights, UntrainedStepCount, format_steps
from .coefficients import (
    AUTO,
    NoLearnedSchedule,
    WrongModelFamily,
    runnable_steps,
    trained_step_counts,
)

PREVIEW = "Diffusion Preview"
REFINE = "Diffusion Refine"
SAMPLER_NODE = "Consistency Solver Sampler"
SCHEDULER_NODE = "Consistency Solver Scheduler"
SAMPLER_BY_NAME = "the consistency_solver sampler"  # picked by name in KSampler, KSamplerAdvanced, KSamplerSelect
SCHEDULER_BY_NAME = "the consistency_solver scheduler"  # picked by name in KSampler, BasicScheduler, ...
FAMILIES = {"eps": "SD1.5/SDXL-type models", "flow": "flow models (SD3, Flux)"}
WORDED = (CoefficientFileError, WrongModelFamily, NoLearnedSchedule, UntrainedStepCount, InvalidWeights)


@dataclass(frozen=True)
class Run:
    """What the user set for a run: enough to say what to change. ``place`` is where it is worded (the node)."""

    choice: str  # the coefficient choice: auto, a file name or a preset
    coefficients: str  # how messages name it (``describe_choice``)
    steps: int | None = None
    denoise: float = 1.0
    learned_schedule: bool = False  # the run's scheduler is consistency_solver
    source: CoefficientSource | None = None  # once resolved
    one_more_step: tuple[str, ...] = ()  # samplers for which KSampler asks the scheduler for one step more
    place: str = ""


class RunProblem(ValueError):
    """A problem as data (``error``) with the run it appeared in, raised where it is found; ``worded_at`` words it."""

    def __init__(self, error: Exception, run: Run):
        self.error, self.run = error, run
        super().__init__(str(error))


@contextmanager
def problems_of(run: Run) -> Iterator[None]:
    """Re-raise the problems of the block with the facts of ``run`` (for the node that words them)."""
    try:
        yield
    except WORDED as error:
        raise RunProblem(error, run) from error


@contextmanager
def worded_at(place: str) -> Iterator[None]:
    """Re-raise the block's run problems worded for ``place``: a plain ValueError, as ComfyUI's dialog shows its
    type, with the facts kept as its ``__cause__``."""
    try:
        yield
    except RunProblem as problem:
        raise ValueError(user_message(problem.error, replace(problem.run, place=place))) from problem.error


Function = TypeVar("Function", bound=Callable[..., Any])


def worded(place: str, function: Function) -> Function:
    """``function`` with its run problems worded for ``place`` (the sampler and scheduler a node hands to ComfyUI,
    whose errors surface in ComfyUI's own nodes)."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        with worded_at(place):
            return function(*args, **kwargs)

    return run  # type: ignore[return-value]


def user_message(error: Exception, run: Run) -> str:
    """The message for one problem at ``run``: what to change first, then why."""
    if isinstance(error, CoefficientFileError):
        text = _file_message(error, run)
    elif isinstance(error, WrongModelFamily):
        text = (
            f"choose coefficients made for {FAMILIES[error.kind]} in {run.place} ('auto' picks the pack's default "
            f"for the model): the coefficient file '{os.path.basename(error.path)}' was made for "
            f"{FAMILIES[error.file_kind]}."
        )
    elif isinstance(error, NoLearnedSchedule):
        text = _no_schedule_message(run)
    elif isinstance(error, UntrainedStepCount):
        text = _schedule_steps_message(error, run) if error.what == "schedule" else _steps_message(error, run)
    else:
        text = (
            f"{_choose_other(run)}: {run.coefficients} gives weights the sampler cannot use for these sigmas "
            f"({error.problem})."
        )
    return text[0].upper() + text[1:]


def _choose_other(run: Run) -> str:
    if run.place == SAMPLER_BY_NAME:
        return "pick another sampler than consistency_solver"
    if run.place == SCHEDULER_BY_NAME:
        return "pick another scheduler than consistency_solver"
    if run.place == REFINE:
        return "pick a stock scheduler (simple, karras, ...) in Diffusion Refine"
    return f"choose other coefficients in {run.place}"


def _file_message(error: CoefficientFileError, run: Run) -> str:
    name = os.path.basename(error.path)
    if run.choice == AUTO:
        return (
            f"reinstall the ConsistencySolver node pack, or {_choose_other(run)}: its default coefficient file "
            f"{name} cannot be used ({error.problem})."
        )
    return f"{_choose_other(run)}: the coefficient file '{name}' cannot be used ({error.problem})."


def _no_schedule_message(run: Run) -> str:
    why = f"{run.coefficients} carries no learned schedule, which the consistency_solver scheduler needs"
    if run.place == PREVIEW:
        return (
            f"pick a stock scheduler (simple, karras, ...) in Diffusion Preview, or coefficients that carry a "
            f"learned schedule such as 'auto': {why}."
        )
    if run.place == REFINE:
        return (
            f"pick a stock scheduler (simple, karras, ...) in Diffusion Refine: the preview's coefficients, "
            f"{run.coefficients}, carry no learned schedule, which the consistency_solver scheduler needs."
        )
    if run.place == SCHEDULER_NODE:
        return (
            f"choose coefficients that carry a learned schedule, such as 'auto', in the Consistency Solver "
            f"Scheduler, or use BasicScheduler: {why}."
        )
    return (
        f"pick another scheduler than consistency_solver: {why}. The Consistency Solver Scheduler node can read "
        f"the schedule of another coefficient file."
    )


def _schedule_steps_message(error: UntrainedStepCount, run: Run) -> str:
    learned = format_steps(error.trained)
    if run.place == SCHEDULER_BY_NAME:
        one_more = f"; {', '.join(run.one_more_step)} ask for one step more" if run.one_more_step else ""
        return (
            f"set steps so that the consistency_solver scheduler is asked for {learned} steps, or pick another "
            f"scheduler: the schedule learned with {run.coefficients} covers {learned} steps, and this run asks "
            f"for {error.asked}. Below denoise 1 a run asks for steps / denoise (8 steps at denoise 0.5 ask "
            f"for 16){one_more}."
        )
    why = f"the consistency_solver scheduler uses the schedule learned with {run.coefficients}, which covers {learned}"
    asked = f"{error.asked}" if run.denoise >= 1 else f"{error.asked} (steps / denoise at denoise {run.denoise:g})"
    return _set_steps(run, f"{why} steps, not {asked}.")


def _steps_message(error: UntrainedStepCount, run: Run) -> str:
    trained = format_steps(error.trained)
    why = f"{run.coefficients} was trained for {trained} steps, not {error.asked}"
    if run.place == SAMPLER_BY_NAME:
        return (
            f"set steps to {trained} for the consistency_solver sampler, or pick another sampler: "
            f"{run.coefficients} was trained for {trained} steps, and this run has {error.asked}."
        )
    if run.place == SAMPLER_NODE:
        switch = ", or turn on its allow_untrained_steps" if error.what == "policy" else ""
        return (
            f"give the Consistency Solver Sampler {trained} steps (the steps of the scheduler that makes its "
            f"sigmas){switch}: {why}."
        )
    if run.learned_schedule and run.denoise < 1 and run.source is not None and run.source.schedule is not None:
        learned = format_steps(run.source.schedule.positions)
        why += f", and at denoise {run.denoise:g} the learned schedule needs steps / denoise within {learned}"
    return _set_steps(run, f"{why}.")


def _set_steps(run: Run, why: str) -> str:
    """What to set at a node with steps (and denoise) widgets: the step counts that run, and a stock scheduler where
    that alone, or with trained step counts, fixes the run; where no count runs at this denoise, raising it may."""
    stock = "use BasicScheduler" if run.place == SCHEDULER_NODE else "pick a stock scheduler"
    if run.source is None:
        return f"{stock} in {run.place}: {why}"
    counts = trained_step_counts(run.source) if run.place == PREVIEW else None
    runnable = runnable_steps(run.source, run.denoise, run.learned_schedule, counts is not None)
    if not runnable:
        stock_counts = counts is not None and run.steps not in counts
        counts_too = f" and set steps to {format_steps(counts)}" if stock_counts else ""
        higher = ", or raise denoise" if run.learned_schedule and run.denoise < 1 else ""
        return f"{stock}{counts_too} in {run.place}{higher}: {why}"
    change = f"set steps to {format_steps(runnable)}"
    if not run.learned_schedule or (counts is not None and list(counts) == runnable):
        return f"{change} in {run.place}: {why}"
    if counts is None or run.steps in counts:
        return f"{change} in {run.place}, or {stock}: {why}"
    return f"{change} in {run.place}, or {stock} and set steps to {format_steps(counts)}: {why}"
