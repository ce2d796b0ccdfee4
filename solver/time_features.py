"""The one place that maps a run's sigmas to the policy's time features.

A policy sees only the times of its step: a pair of numbers per step (the paper's design), computed
here for the whole run before sampling starts. The feature definition is stored in every policy
file, so a file is always evaluated with the conditioning it was trained on.

Kinds:
- ``sd15_timestep``: the released SD1.5 policy's input, ``(t_i/999, (t_i - 1000//N)/999)``, with
  t_i the model's training timestep of sigma_i and N the number of steps of the run. It needs a
  sigma -> timestep mapping (a ComfyUI ``model_sampling`` or ``solver.schedules.DiscreteSchedule``).
- ``sigma``: ``(sigma_i, sigma_{i+1})``, for flow models (sigma in [0, 1]), as the paper's flow policy.
- ``log_sigma``: ``(log sigma_i, log sigma_{i+1})`` with sigma clamped below at ``LOG_SIGMA_FLOOR`` so
  the final step to sigma = 0 stays finite; defined for every model family and schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import check_choice

TIME_FEATURE_KINDS = ("sd15_timestep", "sigma", "log_sigma")
LOG_SIGMA_FLOOR = 1e-3

SigmaToTimestep = Callable[[torch.Tensor], torch.Tensor]


def time_features(sigmas: torch.Tensor, kind: str, sigma_to_timestep: SigmaToTimestep | None = None) -> torch.Tensor:
    """Return the policy input for every step of a run: a float64 CPU tensor of shape [steps, 2]."""
    check_choice("time-feature kind", kind, TIME_FEATURE_KINDS)
    sigmas = sigmas.detach().to("cpu", torch.float64)
    steps = len(sigmas) - 1
    if kind == "sigma":
        return torch.stack([sigmas[:-1], sigmas[1:]], dim=1)
    if kind == "log_sigma":
        logs = sigmas.clamp(min=LOG_SIGMA_FLOOR).log()
        return torch.stack([logs[:-1], logs[1:]], dim=1)
    if sigma_to_timestep is None:
        raise ValueError(
            "time features 'sd15_timestep' need the model's sigma -> timestep mapping: pass the "
            "model_sampling of the model (ComfyUI does this for you) or a solver.schedules.DiscreteSchedule"
        )
    timesteps = torch.as_tensor(sigma_to_timestep(sigmas[:-1].float())).to("cpu", torch.float64).round()
    landing = timesteps - 1000 // steps
    return torch.stack([timesteps / 999.0, landing / 999.0], dim=1)
