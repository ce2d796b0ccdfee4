"""Training and held-out reference sets for the built-in test beds (the one generator: evaluation/references.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluation.references import (
    held_out_seeds,
    reference_cache_dir,
    reference_finals,
    seeded_batch,
    training_seeds,
)
from ..testbeds import get_testbed
from ..testbeds.base import TestBed
from .loop import Problem, ReferenceSet
from .rewards import Reward


@dataclass(frozen=True)
class ReferenceSettings:
    method: str = "multistep"  # a 40-step high-order multistep final, the benchmark's reference
    steps: int = 40
    train_count: int = 256
    held_out_count: int = 128
    cache_dir: str | None = None  # None: references.reference_cache_dir()


def reference_set(bed: TestBed, seeds: list[int], settings: ReferenceSettings) -> ReferenceSet:
    noises, labels = seeded_batch(bed, seeds)
    with torch.no_grad():
        finals = reference_finals(
            bed,
            noises,
            labels,
            method=settings.method,
            steps=settings.steps,
            cache_dir=settings.cache_dir or reference_cache_dir(),
        )
    return ReferenceSet(noises, labels, finals)


def bed_problem(name: str, reward: Reward, settings: ReferenceSettings) -> Problem:
    """The built-in bed called ``name`` as a Problem (see ``reference_problem``)."""
    return reference_problem(get_testbed(name), reward, settings)


def reference_problem(bed: TestBed, reward: Reward, settings: ReferenceSettings) -> Problem:
    """``bed`` with training noises (seeds < 10_000), held-out noises (seeds >= 10_000) and their references."""
    return Problem(
        bed=bed,
        train=reference_set(bed, training_seeds(settings.train_count), settings),
        held_out=reference_set(bed, held_out_seeds(settings.held_out_count), settings),
        reward=reward,
    )
