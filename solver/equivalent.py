"""The weight table of a stock linear sampler: ConsistencySolver's family contains ComfyUI's multistep samplers.

A sampler that calls the model once a step, combines its outputs linearly and does not move where every derivative is
0 (euler, dpmpp_2m, deis, ipndm(_v), uni_pc(_bh2), res_multistep) lands on
``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_k w_k(i) d_{i+1-k}`` for one full-history table w on its sigmas,
its corrector and exponential integrator included. ``equivalent_table`` measures that table with a model that
answers random vectors (so it costs no real model call) and refuses a sampler outside the family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import NotLinearMultistep
from .sampling import to_d

# The probe runs in float32, as ComfyUI's samplers do (uni_pc builds float32 tensors and refuses a float64 state), so a
# row of a sampler in the family misses by rounding, about 1e-6 of the step; outside the family by far more.
EQUIVALENCE_TOLERANCE = 1e-4
PROBE_ELEMENTS = 1024  # far more than any history, so every row's fit is overdetermined and averages the rounding


def equivalent_table(sampler: Callable[..., torch.Tensor], sigmas: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The [steps, steps] full-history weights (newest derivative first, float64) with which the ConsistencySolver
    step reproduces ``sampler`` (k-diffusion contract) on ``sigmas``, exactly up to rounding.

    The sampler runs once on a model whose denoised estimates are random and independent of its input; row i is
    the least-squares fit of the state it reached after step i on the i + 1 derivatives seen so far. Raises
    NotLinearMultistep when the sampler does not call the model once a step, or when a row's fit misses (a
    stochastic sampler, one that asks the model at other sigmas, or one not linear in the model's outputs).
    """
    probe_sigmas = sigmas.detach().to("cpu", torch.float32).clone()  # uni_pc writes its last sigma (0.001) into it
    sigmas = probe_sigmas.double()
    steps = len(sigmas) - 1
    generator = torch.Generator().manual_seed(seed)
    states, denoised = [], []

    def probe(x: torch.Tensor, sigma: torch.Tensor, **kwargs: object) -> torch.Tensor:
        states.append(x.detach().clone())
        denoised.append(torch.randn(x.shape, generator=generator))
        return denoised[-1]

    start = torch.randn(1, PROBE_ELEMENTS, generator=generator)
    final = sampler(probe, start, probe_sigmas, extra_args={}, callback=None, disable=True).detach().double()
    if len(states) != steps:
        raise NotLinearMultistep(f"it called the model {len(states)} times for {steps} steps, not once a step")
    states = [x.double() for x in states] + [final]
    derivatives = [to_d(states[i], sigmas[i], denoised[i].double()).flatten() for i in range(steps)]
    table = torch.zeros(steps, steps, dtype=torch.float64)
    for i in range(steps):
        columns = torch.stack(derivatives[i::-1], dim=1) * (sigmas[i + 1] - sigmas[i])
        gap = (states[i + 1] - states[i]).flatten()
        row = torch.linalg.lstsq(columns, gap.unsqueeze(1)).solution.squeeze(1)
        miss = float((columns @ row - gap).norm() / gap.norm().clamp_min(1e-300))
        if not miss <= EQUIVALENCE_TOLERANCE:
            raise NotLinearMultistep(
                f"step {i} is no linear combination of the derivatives so far (misses by {miss:.2g})"
            )
        table[i, : i + 1] = row
    return table
