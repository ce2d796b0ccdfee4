"""The refine the previews should match, recorded from its model calls, and what a sampler does before it runs.

A sampler's callback is not enough (uni_pc reports the state after its step and no sigma; heun-like samplers call
the model twice a step), so the trajectory is read from the model calls themselves: at every nonzero sigma of the
refine's schedule, the last call there is at the sampler's state (a predictor call at that sigma comes from an
earlier step, so before it), with the model's denoised estimate of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Sampler = Callable[..., Tensor]  # k-diffusion contract: sampler(model, x, sigmas, extra_args=, callback=, disable=)
OnCalls = Callable[[int], None]  # told of n model calls; n = 0 just before a call (it may raise to cancel)
SIGMA_MATCH = 1e-5  # relative: a call at a schedule sigma, whatever float round trip the sampler took
# Relative: a call near a schedule sigma, where no call is at it: samplers in log-SNR move a flow model's first sigma,
# 1, down by 1e-4 of it (ComfyUI's offset_first_sigma_for_snr).
SIGMA_NEAR = 1e-3


@dataclass(frozen=True)
class TargetRun:
    """The refine from the calibration noises: the final each preview should match.

    ``sigmas`` [R] are the run's nonzero sigmas, decreasing from the model's sigma_max; ``states`` and ``denoised``
    [R, M, ...] the sampler's state and the model's denoised estimate at each; ``finals`` [M, ...] its result;
    ``model_calls`` what it cost (one call = one latent through the guided model).
    ``states[0]`` is where every preview starts: the noise as the sampler scales it at sigma_max (ComfyUI's
    ``model_sampling.noise_scaling``: ``noise * sqrt(1 + sigma_max^2)`` for EPS, ``noise * sigma_max`` for flow).
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

    def subset(self, samples: Tensor) -> TargetRun:
        """The run of some of its noises (what they cost is not split out: ``model_calls`` is 0)."""
        return TargetRun(self.sigmas, self.states[:, samples], self.denoised[:, samples], self.finals[samples], 0)

    @staticmethod
    def joined(runs: list[TargetRun]) -> TargetRun:
        """Runs on the same sigmas from different noises (one per prompt) as one run, noises in order."""
        first = runs[0]
        if any(not torch.equal(run.sigmas, first.sigmas) for run in runs):
            raise ValueError("only runs on the same sigmas can be joined")
        return TargetRun(
            first.sigmas,
            torch.cat([run.states for run in runs], dim=1),
            torch.cat([run.denoised for run in runs], dim=1),
            torch.cat([run.finals for run in runs]),
            sum(run.model_calls for run in runs),
        )


class CountedModel:
    """A model whose calls are counted per latent and reported to ``on_calls``. Every other attribute is the
    wrapped model's, so samplers that read ``model.inner_model`` (ancestral, SDE and CFG++ ones) find it."""

    def __init__(self, model: Callable[..., Tensor], on_calls: OnCalls | None = None):
        self.model, self.on_calls, self.calls = model, on_calls, 0

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        if self.on_calls is not None:
            self.on_calls(0)
        denoised = self.model(x, sigma, **kwargs)
        self.calls += x.shape[0]
        if self.on_calls is not None:
            self.on_calls(x.shape[0])
        return denoised

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def match(at: float, sigmas: list[float]) -> tuple[int, int] | None:
    """Which of ``sigmas`` a call at sigma ``at`` is at: (index, 0) at it, (index, 1) near it, or None."""
    for index, value in enumerate(sigmas):
        if math.isclose(at, value, rel_tol=SIGMA_MATCH):
            return index, 0
    for index, value in enumerate(sigmas):
        if math.isclose(at, value, rel_tol=SIGMA_NEAR):
            return index, 1
    return None


class _Recording(CountedModel):
    """A CountedModel that keeps, for each of ``sigmas``, the last call's state and denoised estimate at it (or, if
    no call is at it, near it)."""

    def __init__(self, model: Callable[..., Tensor], on_calls: OnCalls | None, sigmas: list[float]):
        super().__init__(model, on_calls)
        self.sigmas, self.states, self.denoised, self.nearness = sigmas, {}, {}, {}

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        denoised = super().__call__(x, sigma, **kwargs)
        found = match(float(sigma.flatten()[0]), self.sigmas)
        if found is not None and found[1] <= self.nearness.get(found[0], 1):
            index, self.nearness[index] = found
            self.states[index] = x.detach().float().cpu()
            self.denoised[index] = denoised.detach().float().cpu()
        return denoised


class MissedSigma(ValueError):
    """The refine sampler never evaluated the model at a sigma of its schedule (it steps on a grid of its own)."""

    def __init__(self, sigma: float):
        self.sigma = sigma
        super().__init__(f"the refine never evaluated the model at sigma {sigma:.5g} of its schedule")


def record_run(
    sampler: Sampler,
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    on_calls: OnCalls | None = None,
) -> TargetRun:
    """Run ``sampler`` from the starting state ``x`` at ``sigmas[0]`` and record its trajectory at the nonzero
    ``sigmas`` as a TargetRun (MissedSigma when it skips one). Runs without gradients."""
    recording = _Recording(model, on_calls, [float(s) for s in sigmas if s > 0])
    with torch.no_grad():
        # uni_pc writes into the sigmas it is given: it gets a copy.
        finals = sampler(recording, x, sigmas.clone(), extra_args=extra_args or {}, callback=None, disable=True)
    count = len(recording.sigmas)
    missed = [recording.sigmas[i] for i in range(count) if i not in recording.states]
    if missed:
        raise MissedSigma(missed[0])
    return TargetRun(
        sigmas=torch.tensor(recording.sigmas, dtype=torch.float64),
        states=torch.stack([recording.states[i] for i in range(count)]),
        denoised=torch.stack([recording.denoised[i] for i in range(count)]),
        finals=finals.detach().float().cpu(),
        model_calls=recording.calls,
    )


@dataclass(frozen=True)
class SamplerProbe:
    """What a sampler does on given sigmas, found without a real model call: ``calls`` per latent in a run, whether
    its result depends on the seed of its noise (``deterministic`` False for ancestral and SDE samplers), and the
    first nonzero sigma of the schedule where it never asks the model (``missed``: it steps on a grid of its own),
    or None."""

    calls: int
    deterministic: bool
    missed: float | None


def halfway(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
    """The stand-in's answer: the state pulled halfway to 0, a smooth denoiser that costs nothing."""
    return 0.5 * x


def probe_sampler(
    sampler: Sampler,
    model: Any,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    answer: Callable[..., Tensor] = halfway,
) -> SamplerProbe:
    """Run ``sampler`` twice, with two noise seeds, from ``x`` on a stand-in for ``model``: its attributes, and
    ``answer(x, sigma, **extra_args)`` instead of its call. Costs no model call."""
    finals = []
    for seed in (0, 1):
        stand_in = _StandIn(model, answer)
        with torch.no_grad():
            finals.append(sampler(stand_in, x, sigmas.clone(), extra_args={**(extra_args or {}), "seed": seed},
                                  callback=None, disable=True))  # fmt: skip
    wanted = [float(s) for s in sigmas if s > 0]
    seen = {found[0] for at in stand_in.sigmas if (found := match(at, wanted)) is not None}
    missed = [s for index, s in enumerate(wanted) if index not in seen]
    return SamplerProbe(
        calls=stand_in.calls // x.shape[0],
        deterministic=bool(torch.equal(finals[0], finals[1])),
        missed=missed[0] if missed else None,
    )


class _StandIn:
    """``model``'s attributes, but a call is counted, with its sigma, and answered by ``answer``."""

    def __init__(self, model: Any, answer: Callable[..., Tensor]):
        self.model, self.answer, self.calls, self.sigmas = model, answer, 0, set()

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        self.calls += x.shape[0]
        self.sigmas.add(float(sigma.flatten()[0]))
        return self.answer(x, sigma, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
