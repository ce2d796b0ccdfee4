"""Problems as data: each exception carries the facts of what was wrong, and a plain default message.

They are raised where a problem is found; whoever meets the user (the ComfyUI nodes, the trainer's
command line) words them for what that user can change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_STEP_COUNTS = re.compile(r"(\d+)(?:-(\d+))?")  # one part of a step list: 5, or the range 4-12


def format_steps(counts: Iterable[int]) -> str:
    """``4, 5, 8`` or, for counts without gaps, ``4-12``: how every message lists step counts."""
    ordered = sorted(counts)
    if len(ordered) > 1 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(str(n) for n in ordered)


def parse_step_counts(text: str) -> tuple[int, ...]:
    """The inverse of ``format_steps``: ``"4-12"``, ``"5,8"`` or ``"4-6, 8"`` -> the step counts, ascending, each once.

    Raises ValueError, in plain words, for anything else: no count, a count below 1, a range running down.
    """
    bounds = []
    for part in filter(None, text.replace(" ", "").split(",")):
        match = _STEP_COUNTS.fullmatch(part)
        bounds.append((int(match[1]), int(match[2] or match[1])) if match else (0, 0))
    if not bounds or any(not 1 <= first <= last for first, last in bounds):
        raise ValueError(
            f"write step counts as whole numbers of at least 1, a range or a list: 4-12 or 5,8 (got {text!r})"
        )
    return tuple(sorted({n for first, last in bounds for n in range(first, last + 1)}))


class UnknownChoice(ValueError):
    """A value that is not one of the allowed choices."""

    def __init__(self, what: str, value: object, choices: Sequence[object]):
        self.what, self.value, self.choices = what, value, tuple(choices)
        super().__init__(f"unknown {what} {value!r}; choose one of {', '.join(str(c) for c in self.choices)}")


def check_choice(what: str, value: object, choices: Sequence[object]) -> None:
    """Raise UnknownChoice unless ``value`` is one of ``choices`` (``what`` names the setting in the message)."""
    if value not in choices:
        raise UnknownChoice(what, value, choices)


class UntrainedStepCount(ValueError):
    """Coefficients (``what`` = ``policy`` or ``table``) or a learned schedule (``schedule``) asked for a step
    count they were not trained for."""

    def __init__(self, what: str, asked: int, trained: Iterable[int]):
        self.what, self.asked, self.trained = what, asked, tuple(sorted(trained))
        super().__init__(
            f"this {what} was trained for {format_steps(self.trained)} steps, not {asked}; "
            "sample with one of the trained step counts"
        )


class InvalidWeights(ValueError):
    """A run's weight table that the sampler cannot use (``problem`` says why)."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(f"unusable coefficient table: {problem}")


class NotLinearMultistep(ValueError):
    """A sampler that no weight table reproduces (``problem`` says why): it must call the model once a step and
    combine the derivatives linearly, without noise (``solver.equivalent.equivalent_table``)."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(
            f"use a deterministic sampler that calls the model once a step (euler, dpmpp_2m, deis, ipndm, uni_pc, "
            f"res_multistep): this one is not a linear multistep method, {problem}"
        )
