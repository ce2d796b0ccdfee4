"""equivalent_table: the weight table with which the ConsistencySolver step reproduces a linear stock sampler."""

from functools import partial

import pytest
import torch

from consistency_solver.solver import Preset, TableCoefficients, adams_bashforth_weights, sample_consistency_solver
from consistency_solver.solver.equivalent import equivalent_table
from consistency_solver.solver.errors import NotLinearMultistep
from consistency_solver.training.evaluation.references import held_out_seeds, seeded_batch
from consistency_solver.training.evaluation.stock_samplers import (
    import_comfy,
    stock_sampler,
    stock_sampler_sigmas,
)
from consistency_solver.training.testbeds import get_testbed

torch.set_num_threads(1)


needs_comfy = pytest.mark.usefixtures("comfy_samplers")


def sample_with_table(table: torch.Tensor, model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    steps = len(sigmas) - 1
    coefficients = TableCoefficients({steps: table}, order=steps, row_sums="free")
    return sample_consistency_solver(model, x, sigmas, coefficients=coefficients, disable=True)


def test_a_preset_gives_back_its_own_weights():
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0], dtype=torch.float64)
    sampler = partial(sample_consistency_solver, coefficients=Preset("ab3"))
    table = equivalent_table(sampler, sigmas)
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[:, :3] = adams_bashforth_weights(sigmas, 3)
    assert torch.allclose(table, expected, atol=1e-5)


def test_a_stochastic_sampler_is_refused():
    def euler_with_fresh_noise(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
            x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i] + 0.1 * torch.randn_like(x)
        return x

    with pytest.raises(NotLinearMultistep, match="deterministic sampler .* no linear combination"):
        equivalent_table(euler_with_fresh_noise, torch.tensor([10.0, 3.0, 1.0, 0.0]))


@needs_comfy
@pytest.mark.parametrize("sampler_name", ["uni_pc", "dpmpp_2m", "deis"])
@pytest.mark.parametrize("bed_name", ["gmm-vector-eps-cfg", "gmm-image-flow"])
def test_the_table_reproduces_comfyuis_sampler_on_its_sigmas(sampler_name, bed_name):
    bed = get_testbed(bed_name)
    noise, labels = seeded_batch(bed, held_out_seeds(16))
    sigmas = stock_sampler_sigmas(sampler_name, bed.sigmas, 5).float()
    table = equivalent_table(stock_sampler(sampler_name), sigmas)
    x = bed.initial_state(noise, sigmas)
    theirs = stock_sampler(sampler_name)(bed.model(labels), x, sigmas.clone(), disable=True)
    ours = sample_with_table(table, bed.model(labels), x, sigmas)
    # Both run in float32 (ComfyUI's uni_pc refuses float64); the states reach about 80 on the EPS bed.
    assert (ours - theirs).abs().max() < 2e-4 * theirs.abs().max()
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max() or sampler_name == "uni_pc"


@needs_comfy
def test_comfyuis_stochastic_and_two_call_samplers_are_refused():
    sampling = import_comfy()
    sigmas = get_testbed("gmm-vector-eps").sigmas(5).float()
    assert equivalent_table(sampling.sample_euler, sigmas).sum(dim=1).allclose(torch.ones(5, dtype=torch.float64))
    with pytest.raises(NotLinearMultistep, match="no linear combination"):
        equivalent_table(partial(sampling.sample_euler, s_churn=1.0), sigmas)  # Karras churn: fresh noise a step
    with pytest.raises(NotLinearMultistep, match="called the model 9 times for 5 steps"):
        equivalent_table(sampling.sample_heun, sigmas)
