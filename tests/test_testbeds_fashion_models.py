"""The flow (CONST, shift 3) and V-prediction Fashion-MNIST beds: ComfyUI's conventions, training targets, shipped
weights (sample quality: test_testbeds_fashion)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from fixtures.comfyui import missing_comfyui
from safetensors import safe_open

from consistency_solver.solver import UnknownChoice
from consistency_solver.solver.schedules import flow_sigmas
from consistency_solver.training.evaluation import stock_samplers
from consistency_solver.training.testbeds import FASHION_BEDS, TESTBED_NAMES, get_testbed
from consistency_solver.training.testbeds.base import EPS_SIGMA_MAX, EPS_SIGMA_MIN, FLOW_SHIFT, FLOW_SIGMA_MIN
from consistency_solver.training.testbeds.fashion import (
    DATA_DIR,
    FASHION_MODELS,
    FLOW_UNET_WEIGHTS,
    V_UNET_WEIGHTS,
    VP_SCHEDULE,
    FashionTestBed,
    FashionUNet,
    flow_sigma,
    load_unet,
    timestep_feature,
)
from consistency_solver.training.testbeds.train_networks import UNET_LOSSES
from consistency_solver.training.testbeds.train_networks import main as train_networks_main

# sha256 of the shipped weights: retraining changes them, and then every cached reference and measured table.
SHIPPED_SHA256 = {
    FLOW_UNET_WEIGHTS.name: "811e3be7b1e4fb94513c7ad2ac84a1f51f8191e4d79fbcced7fbe270fabe5838",
    V_UNET_WEIGHTS.name: "cacb6ecbb65ea70bb1224269f73225d3142bfa9f59a066e585fa23d8ec6e4e32",
}
NEW_BEDS = ("fashion-flow-cfg", "fashion-v-cfg")

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST missing: install the Debian package dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def beds(one_thread) -> dict[str, FashionTestBed]:
    return {name: get_testbed(name) for name in NEW_BEDS}


def random_unet(parameterisation: str) -> FashionUNet:
    """A UNet whose output is not zero (the shipped architecture initialises its last conv to zero)."""
    torch.manual_seed(0)
    net = FashionUNet(parameterisation=parameterisation)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return net.eval().requires_grad_(False)


def oracle_raw(parameterisation: str, images: torch.Tensor):
    """The network output that is exact for a batch known to be ``images``: the velocity eps - x0 (flow) or v (V),
    recovered from the network's input and time feature."""

    def raw(x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        timestep = (c_noise + 1) * 500
        if parameterisation == "flow":
            sigma = (timestep / 1000).reshape(-1, 1, 1, 1)
            return (x - images) / sigma  # x - x0 = sigma (eps - x0)
        sigma = VP_SCHEDULE.sigmas[timestep.round().long()].float().reshape(-1, 1, 1, 1)
        alpha = (sigma**2 + 1).rsqrt()
        noise = (x - alpha * images) / (sigma * alpha)
        return alpha * noise - sigma * alpha * images

    return raw


def test_beds_are_registered_with_their_families_and_kinds():
    assert set(NEW_BEDS) <= set(FASHION_BEDS) <= set(TESTBED_NAMES)
    assert [(FASHION_MODELS[name].model_family, FASHION_MODELS[name].parameterisation) for name in NEW_BEDS] == [
        ("fashion-flow", "flow"),
        ("fashion-v-eps", "v"),
    ]
    with pytest.raises(UnknownChoice, match="fashion-x-cfg"):
        FashionTestBed("fashion-x-cfg")


def test_flow_bed_samples_from_one_on_the_shift_3_schedule(beds):
    bed = beds["fashion-flow-cfg"]
    assert (bed.kind, bed.guidance, bed.shape) == ("flow", 3.0, (1, 28, 28))
    sigmas = bed.sigmas(5)
    t = torch.linspace(1, 0, 6, dtype=torch.float64)
    assert torch.allclose(sigmas, 3 * t / (1 + 2 * t)) and sigmas[0] == 1
    assert torch.equal(sigmas, flow_sigmas(5, FLOW_SHIFT))
    assert bed.sigma_min == pytest.approx(float(flow_sigma(torch.tensor(1e-3, dtype=torch.float64))))


def test_v_bed_uses_the_eps_space_and_sd15_range(beds):
    bed = beds["fashion-v-cfg"]
    assert (bed.kind, bed.guidance) == ("eps", 3.0)
    sigmas = bed.sigmas(8)
    assert sigmas[0].item() == pytest.approx(EPS_SIGMA_MAX) and sigmas[-2].item() == pytest.approx(EPS_SIGMA_MIN)


@pytest.mark.parametrize("parameterisation", ["flow", "v"])
def test_denoiser_returns_x0_when_the_network_is_exact(parameterisation):
    generator = torch.Generator().manual_seed(0)
    images, noise = (
        torch.rand(4, 1, 28, 28, generator=generator) * 2 - 1,
        torch.randn(4, 1, 28, 28, generator=generator),
    )
    net = FashionUNet(parameterisation=parameterisation)
    net.raw = oracle_raw(parameterisation, images)
    if parameterisation == "flow":
        sigma = flow_sigma(torch.tensor([0.05, 0.3, 0.7, 1.0]))
        x = (1 - sigma.reshape(-1, 1, 1, 1)) * images + sigma.reshape(-1, 1, 1, 1) * noise
    else:
        sigma = VP_SCHEDULE.sigmas[[3, 200, 600, 999]].float()  # on the grid, where the timestep is exact
        x = images + sigma.reshape(-1, 1, 1, 1) * noise
    assert torch.allclose(net(x, sigma, torch.zeros(4, dtype=torch.long)), images, atol=1e-4)


@pytest.mark.parametrize("parameterisation", ["flow", "v"])
def test_training_loss_is_zero_for_the_exact_network(parameterisation):
    """The training target and the denoiser agree: the network that is exact at sampling scores 0 in training."""
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    net = FashionUNet(parameterisation=parameterisation)
    net.raw = oracle_raw(parameterisation, images)
    loss = UNET_LOSSES[parameterisation](
        net, images, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(2)
    )
    assert loss.item() < 1e-6


@pytest.fixture(scope="module")
def comfy_model_sampling():
    reason = stock_samplers.comfy_unavailable_reason()
    if reason is not None:
        missing_comfyui(reason)
    import comfy.model_sampling as model_sampling

    return model_sampling


def test_flow_unet_matches_comfyui_const_with_shift_3(comfy_model_sampling):
    class FlowSampling(comfy_model_sampling.ModelSamplingDiscreteFlow, comfy_model_sampling.CONST):
        pass

    sampling = FlowSampling(SimpleNamespace(sampling_settings={"shift": 3.0, "multiplier": 1000}))
    assert torch.allclose(sampling.sigmas.double(), flow_sigma(torch.arange(1, 1001, dtype=torch.float64) / 1000))
    assert float(sampling.sigma_min) == pytest.approx(FLOW_SIGMA_MIN)
    import comfy.samplers

    # The flow bed's default schedule is ComfyUI's ``simple`` whenever the step count divides 1000.
    for steps in (4, 5, 8, 10):
        comfy_simple = comfy.samplers.simple_scheduler(sampling, steps).double()
        assert torch.allclose(comfy_simple, flow_sigmas(steps, FLOW_SHIFT), atol=1e-6)

    net, generator = random_unet("flow"), torch.Generator().manual_seed(3)
    x, labels = torch.randn(5, 1, 28, 28, generator=generator), torch.arange(5)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.004])
    output = net.raw(sampling.calculate_input(sigma, x), timestep_feature(sampling.timestep(sigma)), labels)
    assert torch.allclose(sampling.calculate_denoised(sigma, output, x), net(x, sigma, labels), atol=1e-5)
    assert torch.equal(sampling.noise_scaling(sigma[:1], x, torch.zeros_like(x)), x)  # sigma 1: x_T = noise


def test_v_unet_matches_comfyui_v_prediction_on_the_discrete_schedule(comfy_model_sampling):
    class VSampling(comfy_model_sampling.ModelSamplingDiscrete, comfy_model_sampling.V_PREDICTION):
        pass

    sampling = VSampling(SimpleNamespace(sampling_settings={}))
    assert torch.allclose(sampling.sigmas.double(), VP_SCHEDULE.sigmas, rtol=1e-5)
    net, generator = random_unet("v"), torch.Generator().manual_seed(4)
    x, labels = 3 * torch.randn(5, 1, 28, 28, generator=generator), torch.arange(5)
    # Between grid points too: ComfyUI rounds to the nearest discrete timestep in log sigma, and so must the bed.
    sigma = torch.tensor([14.6, 5.0, 1.0, 0.2, 0.03])
    output = net.raw(sampling.calculate_input(sigma, x), timestep_feature(sampling.timestep(sigma).float()), labels)
    assert torch.allclose(sampling.calculate_denoised(sigma, output, x), net(x, sigma, labels), atol=1e-5)


@pytest.mark.parametrize("path", [FLOW_UNET_WEIGHTS, V_UNET_WEIGHTS], ids=lambda path: path.stem)
def test_shipped_weights_are_the_recorded_fp16_files(path):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHIPPED_SHA256[path.name]
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        assert all(f.get_tensor(name).dtype == torch.float16 for name in f.keys())
    parameterisation = "flow" if path == FLOW_UNET_WEIGHTS else "v"
    assert metadata["parameterisation"] == parameterisation and metadata["seed"] == "0"
    assert 10**6 < int(metadata["params"]) < 3 * 10**6


def test_a_unet_of_another_parameterisation_is_refused():
    with pytest.raises(ValueError, match="parameterisation='flow'"):
        load_unet(FLOW_UNET_WEIGHTS, parameterisation="v")


@needs_data
def test_training_cli_writes_the_parameterisation_it_trained(tmp_path):
    out = tmp_path / "v.safetensors"
    train_networks_main(["unet", "--parameterisation", "v", "--steps", "2", "--batch-size", "8", "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["parameterisation"] == "v"
    assert load_unet(out, parameterisation="v").parameterisation == "v"
