"""The project's dpmpp_2m reimplementation and ComfyUI's stock samplers on the GMM beds."""

import pytest
import torch

from consistency_solver.solver.schedules import exponential_sigmas
from consistency_solver.training.evaluation.references import held_out_seeds, seeded_batch
from consistency_solver.training.evaluation.stock_samplers import (
    BASELINE_SAMPLERS,
    STOCK_SAMPLERS,
    baseline_sampler,
    sample_dpmpp_2m,
    stock_sampler,
    stock_sampler_sigmas,
)
from consistency_solver.training.testbeds import get_testbed

needs_comfy = pytest.mark.usefixtures("comfy_samplers")

torch.set_num_threads(1)  # the cores are shared; one thread is faster than two contended ones


def test_dpmpp_2m_converges_at_second_order_on_gaussian_data():
    # Data N(0, 1): D(x, sigma) = x / (1 + sigma^2), and the PF-ODE solution is x(sigma) ~ sqrt(1 + sigma^2).
    x = torch.full((1, 1), 10.0, dtype=torch.float64)

    def model(x, sigma):
        return x / (1 + sigma.reshape(-1, 1) ** 2)

    # The last step returns D(x(0.1), 0.1) with x(0.1) = 10 sqrt(1.01 / 101) = 1.
    exact = 1.0 / 1.01
    errors = [
        abs(float(sample_dpmpp_2m(model, x, exponential_sigmas(steps, 0.1, 10.0), disable=True)) - exact)
        for steps in (10, 20, 40)
    ]
    assert errors[2] < 1e-3
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3  # about 4 per halving: second order


def test_baseline_registry():
    assert set(BASELINE_SAMPLERS) == {"euler", "dpmpp_2m"}
    with pytest.raises(ValueError, match="dpmpp_2m"):
        baseline_sampler("heun")


@needs_comfy
@pytest.mark.parametrize("name", ["gmm-vector-eps-cfg", "gmm-vector-flow-cfg"])
def test_reimplementation_matches_comfyui(name):
    bed = get_testbed(name)
    noise, labels = seeded_batch(bed, held_out_seeds(16))
    sigmas = bed.sigmas(8)
    x = bed.initial_state(noise.double(), sigmas)
    for sampler_name in BASELINE_SAMPLERS:
        ours = baseline_sampler(sampler_name)(bed.model(labels), x, sigmas, disable=True)
        theirs = stock_sampler(sampler_name)(bed.model(labels), x, sigmas, disable=True)
        # The solver's Euler accumulates in float32 by design; dpmpp_2m runs in the input's float64.
        tolerance = 1e-5 if sampler_name == "euler" else 1e-9
        assert torch.allclose(ours, theirs, atol=tolerance), sampler_name


@needs_comfy
@pytest.mark.parametrize("sampler_name", STOCK_SAMPLERS)
def test_stock_samplers_run_on_a_bare_bed_model_with_steps_model_calls(sampler_name):
    bed = get_testbed("gmm-vector-flow-cfg")
    noise, labels = seeded_batch(bed, held_out_seeds(8))
    sigmas = stock_sampler_sigmas(sampler_name, bed.sigmas, 6).float()
    calls = []

    def model(x, sigma, **extra_args):
        calls.append(float(sigma[0]))
        return bed.model(labels)(x, sigma)

    out = stock_sampler(sampler_name)(model, bed.initial_state(noise, sigmas), sigmas, disable=True)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert len(calls) == 6


@needs_comfy
def test_uni_pc_gets_ksamplers_sigmas_without_the_penultimate():
    bed = get_testbed("gmm-vector-eps")
    full = bed.sigmas(7)
    assert torch.equal(stock_sampler_sigmas("uni_pc", bed.sigmas, 6), torch.cat([full[:-2], full[-1:]]))
    assert torch.equal(stock_sampler_sigmas("dpmpp_2m", bed.sigmas, 6), bed.sigmas(6))
