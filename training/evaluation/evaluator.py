"""The one evaluator: a preview's consistency RMSE to its reference final, for any sampler on any bed.

A sampler has k-diffusion's contract, ``sampler(model, x, sigmas, extra_args=None, callback=None, disable=None)``
(ComfyUI's stock samplers, the project's dpmpp_2m, ConsistencySolver through ``solver_sampler``). A bed is a test
bed or anything with its interface (the trainer's ComfyUI model): it gives the model for the labels and the initial
state of the noise at the first sigma. The trainer's held-out evaluation and report, the benchmark, the demo and
the preview loop all sample through ``sample_previews``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ...solver import CoefficientSource, sample_consistency_solver
from ..testbeds import TestBed
from .metrics import consistency_rmse

Sampler = Callable[..., Tensor]


def solver_sampler(coefficients: CoefficientSource, model_sampling: Any = None) -> Sampler:
    """ConsistencySolver with ``coefficients`` as a sampler; ``model_sampling`` (anything with ``timestep(sigma)``)
    is what timestep-conditioned policies need."""
    return partial(sample_consistency_solver, coefficients=coefficients, model_sampling=model_sampling)


@torch.no_grad()
def sample_previews(
    bed: TestBed,
    sampler: Sampler,
    sigmas: Tensor,
    noise: Tensor,
    labels: Tensor | None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """The samples ``sampler`` makes on ``sigmas`` from ``noise`` (conditioned on ``labels``)."""
    return sampler(bed.model(labels), bed.initial_state(noise, sigmas), sigmas, callback=callback, disable=True)


def preview_rmse(
    bed: TestBed, sampler: Sampler, sigmas: Tensor, noise: Tensor, labels: Tensor | None, finals: Tensor
) -> float:
    """Consistency RMSE of ``sampler``'s previews to the reference ``finals`` of the same noises."""
    return consistency_rmse(sample_previews(bed, sampler, sigmas, noise, labels).cpu(), finals)
