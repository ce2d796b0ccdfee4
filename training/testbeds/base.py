"""The test-bed interface: a denoiser in ComfyUI's model space plus its schedule, noise and labels.

Every sampler in this project (ConsistencySolver, the presets, ComfyUI's stock samplers) takes the
same ``model(x, sigma_vec, **extra_args) -> denoised`` callable, so a bed only has to say how it
denoises; ``model(labels)`` binds the conditioning. Two model spaces exist, as in ComfyUI:

- ``eps`` (ComfyUI EPS/V, k-diffusion VE form): x = x0 + sigma * eps, sigma in (0, ~14.6].
- ``flow`` (ComfyUI CONST): x = (1 - sigma) * x0 + sigma * eps, sigma in (0, 1].

In both the probability-flow ODE is dx/dsigma = (x - denoised) / sigma, which is what every sampler integrates.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...solver import model_kind
from ...solver.schedules import DiscreteSchedule, StepSchedule, flow_sigmas, karras_sigmas

_SD15 = DiscreteSchedule()
# SD1.5's sigma range (0.0292 .. 14.6146): the eps beds use the schedule real SD1.x runs use.
EPS_SIGMA_MIN, EPS_SIGMA_MAX = _SD15.sigma_min, _SD15.sigma_max
FLOW_SHIFT = 3.0
# ComfyUI's ModelSamplingDiscreteFlow range at shift 3: sigma(t) for t = 1/1000 .. 1.
FLOW_SIGMA_MIN, FLOW_SIGMA_MAX = FLOW_SHIFT * 1e-3 / (1 + (FLOW_SHIFT - 1) * 1e-3), 1.0

Model = Callable[..., Tensor]


class TestBed(abc.ABC):
    """A denoiser with everything needed to sample from it reproducibly.

    Subclasses set the attributes and implement ``denoise``. ``denoise`` accepts float32 or float64
    ``x`` and returns the same dtype (references are solved in float64). A learned bed whose output
    depends on weights must override ``identity`` so cached references change with the weights.
    """

    __test__ = False  # not a pytest class, despite the name

    name: str
    model_family: str
    shape: tuple[int, ...]
    num_classes: int | None
    guidance: float

    @abc.abstractmethod
    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """Guided E[x0 | x] at noise level ``sigma`` (shape [batch]) for a batch ``x`` of shape [batch, *shape]."""

    @property
    def kind(self) -> str:
        """``eps`` or ``flow``: the model space (see the module docstring)."""
        return model_kind(self.model_family)

    def identity(self) -> str:
        """Everything that determines ``denoise``; the key of cached references."""
        return f"{self.name}|{self.model_family}|{self.shape}|{self.num_classes}|guidance={self.guidance!r}"

    def model(self, labels: Tensor | None) -> Model:
        """The sampler-facing callable ``model(x, sigma_vec, **extra_args) -> denoised`` for fixed labels."""

        def model(x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor:
            return self.denoise(x, sigma, labels)

        return model

    def sigmas(self, steps: int) -> Tensor:
        """The bed's default schedule of ``steps`` steps, ending in 0 (float64)."""
        if steps < 1:
            raise ValueError(f"a schedule needs at least 1 step, got {steps}")
        if self.kind == "flow":
            return flow_sigmas(steps, shift=FLOW_SHIFT)
        return karras_sigmas(steps, EPS_SIGMA_MIN, EPS_SIGMA_MAX)

    @property
    def sigma_min(self) -> float:
        return FLOW_SIGMA_MIN if self.kind == "flow" else EPS_SIGMA_MIN

    @property
    def sigma_max(self) -> float:
        return FLOW_SIGMA_MAX if self.kind == "flow" else EPS_SIGMA_MAX

    def initial_state(self, noise: Tensor, sigmas: Tensor) -> Tensor:
        """x at sigmas[0] from standard-normal ``noise`` (empty latent): sigma0 * noise in both model spaces."""
        return noise * sigmas[0].to(noise.dtype)

    def sample_labels(self, count: int, generator: torch.Generator) -> Tensor | None:
        """Uniformly drawn class labels (int64), or None for an unconditional bed."""
        if self.num_classes is None:
            return None
        return torch.randint(self.num_classes, (count,), generator=generator)

    def noise(self, count: int, generator: torch.Generator) -> Tensor:
        """Standard-normal starting noise of shape [count, *shape], float32."""
        return torch.randn(count, *self.shape, generator=generator, dtype=torch.float32)


def run_sigmas(bed, steps: int, schedule: StepSchedule | None) -> Tensor:
    """The sigmas of an N-step run on ``bed`` (a test bed or the ComfyUI backend's model): the learned
    schedule of a coefficient source when it has one, else the bed's default schedule."""
    if schedule is None:
        return bed.sigmas(steps)
    return schedule.sigmas(steps, bed.sigma_min, bed.sigma_max)
