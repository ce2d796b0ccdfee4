"""Noise schedules in pure torch: the discrete SD1.x (VP, epsilon) schedule and common sigma grids.

These mirror what ComfyUI computes (``ModelSamplingDiscrete``, the ``simple`` and ``karras``
schedulers) so that the solver, the tests and the trainer can build the same sigmas without ComfyUI,
and the learned schedules a coefficient file may carry (``StepSchedule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UntrainedStepCount


class DiscreteSchedule:
    """The 1000-step discrete schedule of SD1.x/SDXL in sigma form (sigma_t = sqrt((1 - abar_t) / abar_t)).

    ``timestep(sigma)`` is the nearest training timestep in log-sigma, as ComfyUI's
    ``ModelSamplingDiscrete.timestep`` computes it, so it can stand in for a ComfyUI model_sampling.
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        distances = sigma.log().reshape(-1, 1) - self.log_sigmas.reshape(1, -1)
        return distances.abs().argmin(dim=1).reshape(sigma.shape).to(torch.float64)

    def simple_sigmas(self, steps: int) -> torch.Tensor:
        """ComfyUI's ``simple`` scheduler: every (1000/steps)-th training sigma from the top, then 0."""
        stride = len(self.sigmas) / steps
        picked = [float(self.sigmas[-(1 + int(k * stride))]) for k in range(steps)]
        return torch.tensor([*picked, 0.0], dtype=torch.float64)

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        """diffusers' ``trailing`` spacing (t_k = round(1000 - k * 1000 / N) - 1), the paper's schedule, then 0."""
        timesteps = [round(len(self.sigmas) - k * len(self.sigmas) / steps) - 1 for k in range(steps)]
        return torch.cat([self.sigmas[timesteps], torch.zeros(1, dtype=torch.float64)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) schedule, ending in 0, as k-diffusion's ``get_sigmas_karras``."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """Shifted flow-matching schedule (SD3/Flux style): s = shift*t / (1 + (shift-1)*t), t from 1 to 0."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Log-uniform schedule from sigma_max to sigma_min, ending in 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def schedule_positions(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Where each nonzero sigma of a schedule lies between sigma_max (0) and sigma_min (1), in log sigma.

    Positions, not sigmas, are what a learned schedule stores: they carry over to any model's sigma range.
    """
    span = math.log(sigma_min) - math.log(sigma_max)
    return (sigmas[:-1].log() - math.log(sigma_max)) / span


def sigmas_from_positions(positions: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The inverse of ``schedule_positions``, with the final 0 appended (differentiable in ``positions``)."""
    span = math.log(sigma_min) - math.log(sigma_max)
    sigmas = (math.log(sigma_max) + positions * span).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True)
class StepSchedule:
    """A learned schedule: for each trained step count N, N increasing positions (see ``schedule_positions``).

    Position 0 is sigma_max, where sampling from pure noise starts; the last step goes to sigma 0.
    """

    positions: dict[int, torch.Tensor]

    def __post_init__(self) -> None:
        for steps, positions in self.positions.items():
            problem = validate_positions(positions, steps)
            if problem:
                raise ValueError(f"schedule for {steps} steps: {problem}")

    def sigmas(self, steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
        """The schedule of ``steps`` steps for a model whose sigmas span [sigma_min, sigma_max], ending in 0."""
        if steps not in self.positions:
            raise UntrainedStepCount("schedule", steps, self.positions)
        return sigmas_from_positions(self.positions[steps].to(torch.float64), sigma_min, sigma_max)


def validate_positions(positions: torch.Tensor, steps: int) -> str | None:
    """Why ``positions`` cannot be an N-step schedule, or None when it can."""
    if positions.shape != (steps,):
        return f"shape {tuple(positions.shape)}, expected ({steps},)"
    if not torch.isfinite(positions).all():
        return "positions are not finite"
    if abs(float(positions[0])) > 1e-6:
        return f"the first position is {float(positions[0])}, it must be 0 (sigma_max)"
    if steps > 1 and not (positions[1:] > positions[:-1]).all():
        return f"positions must increase strictly, got {positions.tolist()}"
    if float(positions[-1]) > 1 + 1e-6:
        return f"the last position is {float(positions[-1])}, beyond sigma_min (1)"
    return None
