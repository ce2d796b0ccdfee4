"""The Fashion-MNIST beds beyond the first: flow (CONST, shift 3), V-prediction, and the latent beds (an EPS UNet on
SD1.x's discrete schedule, a flow DiT, a smaller DiT as EPS, a two-level attention UNet as flow): the latent codec,
ComfyUI's conventions, training targets, shipped weights (sample quality: test_testbeds_fashion)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from consistency_solver.solver import UnknownChoice
from consistency_solver.solver.schedules import flow_sigmas
from consistency_solver.training.evaluation.benchmark import Quality
from consistency_solver.training.testbeds import FASHION_BEDS, TESTBED_NAMES, get_testbed
from consistency_solver.training.testbeds.base import EPS_SIGMA_MAX, EPS_SIGMA_MIN, FLOW_SHIFT, FLOW_SIGMA_MIN
from consistency_solver.training.testbeds.fashion import (
    DATA_DIR,
    DIT_EPS_WEIGHTS,
    DIT_FLOW_WEIGHTS,
    FASHION_MODELS,
    FLOW_UNET_WEIGHTS,
    LATENT_EPS_UNET_WEIGHTS,
    LATENT_FLOW_WEIGHTS,
    LATENT_SHAPE,
    V_UNET_WEIGHTS,
    VP_SCHEDULE,
    FashionDenoiser,
    FashionTestBed,
    build_denoiser,
    count_parameters,
    decode_latent,
    denoiser_description,
    encode_latent,
    flow_sigma,
    latent_mix,
    load_denoiser,
    load_fashion_mnist,
    timestep_feature,
)
from consistency_solver.training.testbeds.train_networks import DENOISER_LOSSES, save_weights
from consistency_solver.training.testbeds.train_networks import main as train_networks_main

# sha256 of the shipped weights: retraining changes them, and then every cached reference and measured table.
SHIPPED_SHA256 = {
    FLOW_UNET_WEIGHTS.name: "811e3be7b1e4fb94513c7ad2ac84a1f51f8191e4d79fbcced7fbe270fabe5838",
    V_UNET_WEIGHTS.name: "cacb6ecbb65ea70bb1224269f73225d3142bfa9f59a066e585fa23d8ec6e4e32",
    LATENT_EPS_UNET_WEIGHTS.name: "7b34507d4bc4b904aeb0429f4623caeb529ab12c0c38af7d01b8a191075d614f",
    DIT_FLOW_WEIGHTS.name: "f2202e218032df22e89fb46484b23c674cc475f0a6c6b69cfede2e76ae44df20",
    DIT_EPS_WEIGHTS.name: "238d4a02a86263f80cbc8e4a1f0734184b6f80a55a7e171a498a25c510c565b6",
    LATENT_FLOW_WEIGHTS.name: "7ae3d56d7bc160553e42c174f8d23b769f7df2883102d7968fc9657fc96b5634",
}
NEW_BEDS = ("fashion-flow-cfg", "fashion-v-cfg")
# The beds of this file: (model family, architecture, parameterisation, latent).
DESCRIBED_BEDS = {
    "fashion-flow-cfg": ("fashion-flow", "unet", "flow", False),
    "fashion-v-cfg": ("fashion-v-eps", "unet", "v", False),
    "fashion-latent-eps-cfg": ("fashion-latent-eps", "unet", "eps", True),
    "fashion-dit-flow-cfg": ("fashion-dit-flow", "dit", "flow", True),
    "fashion-dit-eps-cfg": ("fashion-dit-eps", "small-dit", "eps", True),
    "fashion-latent-flow-cfg": ("fashion-latent-flow", "attention-unet", "flow", True),
}
LATENT_BEDS = [name for name, (*_, latent) in DESCRIBED_BEDS.items() if latent]
# (architecture, parameterisation, latent) of every bed network tested here.
NETWORKS = [
    ("unet", "flow", False),
    ("unet", "v", False),
    ("unet", "eps", True),
    ("dit", "flow", True),
    ("small-dit", "eps", True),
    ("attention-unet", "flow", True),
]
NETWORK_IDS = ["flow", "v", "latent-eps", "dit-flow", "dit-eps", "latent-flow"]

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST missing: install the Debian package dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def beds(one_thread) -> dict[str, FashionTestBed]:
    return {name: get_testbed(name) for name in NEW_BEDS}


def random_denoiser(architecture: str, parameterisation: str, latent: bool) -> FashionDenoiser:
    """A network whose output is not zero (the shipped architectures initialise their last layer, and the DiT its
    adaLN-Zero gates, to zero)."""
    torch.manual_seed(0)
    net = build_denoiser(architecture, parameterisation, latent)
    for name, parameter in net.named_parameters():
        if name.endswith("weight") and ("conv_out" in name or "modulation" in name or "patch_out" in name):
            torch.nn.init.normal_(parameter, std=0.1)
    return net.eval().requires_grad_(False)


def oracle_raw(parameterisation: str, images: torch.Tensor):
    """The network output that is exact for a batch known to be ``images``: the velocity eps - x0 (flow), v (V) or
    eps (eps), recovered from the network's input and time feature."""

    def raw(x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        timestep = (c_noise + 1) * 500
        if parameterisation == "flow":
            sigma = (timestep / 1000).reshape(-1, 1, 1, 1)
            return (x - images) / sigma  # x - x0 = sigma (eps - x0)
        sigma = VP_SCHEDULE.sigmas[timestep.round().long()].float().reshape(-1, 1, 1, 1)
        alpha = (sigma**2 + 1).rsqrt()
        noise = (x - alpha * images) / (sigma * alpha)
        return noise if parameterisation == "eps" else alpha * noise - sigma * alpha * images

    return raw


def network_batch(latent: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean samples and noise in the network's space: images in [-1, 1], or their latents."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 1, 28, 28, generator=generator) * 2 - 1
    clean = encode_latent(images) if latent else images
    return clean, torch.randn(clean.shape, generator=generator)


def test_beds_are_registered_with_their_families_and_kinds():
    assert set(DESCRIBED_BEDS) <= set(FASHION_BEDS) <= set(TESTBED_NAMES)
    for name, description in DESCRIBED_BEDS.items():
        model = FASHION_MODELS[name]
        assert (model.model_family, model.architecture, model.parameterisation, model.latent) == description
    with pytest.raises(UnknownChoice, match="fashion-x-cfg"):
        FashionTestBed("fashion-x-cfg")


def test_the_latent_is_an_exact_invertible_linear_map_of_the_image():
    mix = latent_mix()
    assert torch.allclose(mix @ mix.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(mix.abs(), torch.eye(4, dtype=torch.float64))  # a real mix, not a permutation
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    latents = encode_latent(images)
    assert latents.shape == (3, *LATENT_SHAPE)
    assert torch.allclose(decode_latent(latents), images, atol=1e-12)
    assert torch.allclose(encode_latent(decode_latent(latents)), latents, atol=1e-12)
    black = torch.full((1, 1, 28, 28), -1.0, dtype=torch.float64)
    assert encode_latent(black).abs().max() < 1e-12  # the shift makes the black background the zero latent


@needs_data
def test_the_latent_of_the_data_has_unit_std_and_non_zero_channel_means():
    latents = encode_latent(load_fashion_mnist("test")[0].double())
    assert torch.allclose(latents.std(dim=(0, 2, 3)), torch.ones(4, dtype=torch.float64), atol=0.03)
    assert (latents.mean(dim=(0, 2, 3)).abs() > 0.3).all()


@pytest.mark.parametrize("name", LATENT_BEDS)
def test_latent_beds_sample_the_latent_on_their_kinds_schedule_and_decode_it(name):
    bed = get_testbed(name)
    kind = "flow" if DESCRIBED_BEDS[name][2] == "flow" else "eps"
    assert (bed.kind, bed.guidance, bed.shape) == (kind, 3.0, LATENT_SHAPE)
    if kind == "flow":
        assert torch.equal(bed.sigmas(5), flow_sigmas(5, FLOW_SHIFT))  # ComfyUI's simple, as fashion-flow-cfg
    else:
        assert bed.sigmas(8)[0].item() == pytest.approx(EPS_SIGMA_MAX)  # karras, as fashion-v-cfg
    latents = bed.noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(bed.decode(latents), decode_latent(latents))


def test_image_beds_decode_to_their_samples(beds):
    pixels = torch.randn(2, 1, 28, 28)
    assert torch.equal(beds["fashion-v-cfg"].decode(pixels), pixels)


@needs_data
def test_the_benchmark_scores_a_latent_bed_on_decoded_images():
    """Quality decodes a latent bed's samples once, in one place: encoded real images score as those images."""
    bed = get_testbed("fashion-latent-eps-cfg")
    images, labels = load_fashion_mnist("test")
    quality = Quality(bed, labels[:32], 32)
    assert quality(encode_latent(images[:32])) == pytest.approx(quality.score_images(images[:32]), abs=1e-4)


def test_the_networks_have_one_to_three_million_parameters():
    for architecture, parameterisation, latent in NETWORKS:
        assert 10**6 < count_parameters(build_denoiser(architecture, parameterisation, latent)) < 3 * 10**6


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


@pytest.mark.parametrize(("architecture", "parameterisation", "latent"), NETWORKS, ids=NETWORK_IDS)
def test_denoiser_returns_x0_when_the_network_is_exact(architecture, parameterisation, latent):
    clean, noise = network_batch(latent, 0)
    net = build_denoiser(architecture, parameterisation, latent)
    net.raw = oracle_raw(parameterisation, clean)
    if parameterisation == "flow":
        sigma = flow_sigma(torch.tensor([0.05, 0.3, 0.7, 1.0]))
        x = (1 - sigma.reshape(-1, 1, 1, 1)) * clean + sigma.reshape(-1, 1, 1, 1) * noise
    else:
        sigma = VP_SCHEDULE.sigmas[[3, 200, 600, 999]].float()  # on the grid, where the timestep is exact
        x = clean + sigma.reshape(-1, 1, 1, 1) * noise
    assert torch.allclose(net(x, sigma, torch.zeros(4, dtype=torch.long)), clean, atol=1e-4)


@pytest.mark.parametrize(("architecture", "parameterisation", "latent"), NETWORKS, ids=NETWORK_IDS)
def test_training_loss_is_zero_for_the_exact_network(architecture, parameterisation, latent):
    """The training target and the denoiser agree: the network that is exact at sampling scores 0 in training."""
    clean, _ = network_batch(latent, 1)
    net = build_denoiser(architecture, parameterisation, latent)
    net.raw = oracle_raw(parameterisation, clean)
    loss = DENOISER_LOSSES[parameterisation](
        net, clean, torch.zeros(len(clean), dtype=torch.long), torch.Generator().manual_seed(2)
    )
    assert loss.item() < 1e-6


@pytest.fixture
def comfy_model_sampling(comfy_samplers):
    import comfy.model_sampling as model_sampling

    return model_sampling


@pytest.mark.parametrize(
    ("architecture", "latent"),
    [("unet", False), ("dit", True), ("attention-unet", True)],
    ids=["unet", "latent-dit", "latent-attention-unet"],
)
def test_flow_networks_match_comfyui_const_with_shift_3(comfy_model_sampling, architecture, latent):
    class FlowSampling(comfy_model_sampling.ModelSamplingDiscreteFlow, comfy_model_sampling.CONST):
        pass

    sampling = FlowSampling(SimpleNamespace(sampling_settings={"shift": 3.0, "multiplier": 1000}))
    assert torch.allclose(sampling.sigmas.double(), flow_sigma(torch.arange(1, 1001, dtype=torch.float64) / 1000))
    assert float(sampling.sigma_min) == pytest.approx(FLOW_SIGMA_MIN)
    import comfy.samplers

    # The flow beds' default schedule is ComfyUI's ``simple`` whenever the step count divides 1000.
    for steps in (4, 5, 8, 10):
        comfy_simple = comfy.samplers.simple_scheduler(sampling, steps).double()
        assert torch.allclose(comfy_simple, flow_sigmas(steps, FLOW_SHIFT), atol=1e-6)

    net, generator = random_denoiser(architecture, "flow", latent), torch.Generator().manual_seed(3)
    shape = LATENT_SHAPE if latent else (1, 28, 28)
    x, labels = torch.randn(5, *shape, generator=generator), torch.arange(5)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.004])
    output = net.raw(sampling.calculate_input(sigma, x), timestep_feature(sampling.timestep(sigma)), labels)
    assert torch.allclose(sampling.calculate_denoised(sigma, output, x), net(x, sigma, labels), atol=1e-5)
    assert torch.equal(sampling.noise_scaling(sigma[:1], x, torch.zeros_like(x)), x)  # sigma 1: x_T = noise


@pytest.mark.parametrize(
    ("prediction", "architecture", "parameterisation", "latent"),
    [("V_PREDICTION", "unet", "v", False), ("EPS", "unet", "eps", True), ("EPS", "small-dit", "eps", True)],
    ids=["v", "eps", "dit-eps"],
)
def test_discrete_networks_match_comfyui_on_sd1_schedule(
    comfy_model_sampling, prediction, architecture, parameterisation, latent
):
    class DiscreteSampling(comfy_model_sampling.ModelSamplingDiscrete, getattr(comfy_model_sampling, prediction)):
        pass

    sampling = DiscreteSampling(SimpleNamespace(sampling_settings={}))
    assert torch.allclose(sampling.sigmas.double(), VP_SCHEDULE.sigmas, rtol=1e-5)
    net, generator = random_denoiser(architecture, parameterisation, latent), torch.Generator().manual_seed(4)
    shape = LATENT_SHAPE if latent else (1, 28, 28)
    x, labels = 3 * torch.randn(5, *shape, generator=generator), torch.arange(5)
    # Between grid points too: ComfyUI rounds to the nearest discrete timestep in log sigma, and so must the bed.
    sigma = torch.tensor([14.6, 5.0, 1.0, 0.2, 0.03])
    output = net.raw(sampling.calculate_input(sigma, x), timestep_feature(sampling.timestep(sigma).float()), labels)
    # x - 14.6 * eps cancels to a few 1e-5 in float32; a wrong timestep or scaling would be off by far more.
    assert torch.allclose(sampling.calculate_denoised(sigma, output, x), net(x, sigma, labels), atol=1e-4)


# The shipped networks and what their files record: (architecture, parameterisation, space).
SHIPPED_NETWORKS = {
    FLOW_UNET_WEIGHTS: ("unet", "flow", "image"),
    V_UNET_WEIGHTS: ("unet", "v", "image"),
    LATENT_EPS_UNET_WEIGHTS: ("unet", "eps", "latent"),
    DIT_FLOW_WEIGHTS: ("dit", "flow", "latent"),
    DIT_EPS_WEIGHTS: ("small-dit", "eps", "latent"),
    LATENT_FLOW_WEIGHTS: ("attention-unet", "flow", "latent"),
}


@pytest.mark.parametrize("path", list(SHIPPED_NETWORKS), ids=lambda path: path.stem)
def test_shipped_weights_are_the_recorded_fp16_files(path):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHIPPED_SHA256[path.name]
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        assert all(f.get_tensor(name).dtype == torch.float16 for name in f.keys())
    architecture, parameterisation, space = SHIPPED_NETWORKS[path]
    assert metadata["parameterisation"] == parameterisation and metadata["seed"] == "0"
    # The first image UNets were written before the architecture and space were recorded.
    assert (metadata.get("architecture", "unet"), metadata.get("space", "image")) == (architecture, space)
    assert 10**6 < int(metadata["params"]) < 3 * 10**6


def test_a_network_of_another_parameterisation_architecture_or_space_is_refused(tmp_path):
    with pytest.raises(ValueError, match="parameterisation='flow'"):
        load_denoiser(FLOW_UNET_WEIGHTS, parameterisation="v")
    with pytest.raises(ValueError, match="space='latent'"):
        load_denoiser(LATENT_EPS_UNET_WEIGHTS, parameterisation="eps", latent=False)
    dit = tmp_path / "dit.safetensors"
    save_weights(build_denoiser("dit", "flow", latent=True), dit, denoiser_description("dit", "flow", latent=True))
    with pytest.raises(ValueError, match="load it with architecture='dit', parameterisation='flow', space='latent'"):
        load_denoiser(dit, architecture="unet", parameterisation="flow", latent=True)
    assert load_denoiser(dit, architecture="dit", parameterisation="flow", latent=True).architecture == "dit"
    with pytest.raises(ValueError, match="set latent=True"):
        build_denoiser("dit", "flow", latent=False)
    with pytest.raises(UnknownChoice, match="vit"):
        build_denoiser("vit", "flow", latent=True)


def test_training_cli_refuses_a_dit_on_images(capsys):
    with pytest.raises(SystemExit):
        train_networks_main(["dit", "--parameterisation", "flow", "--out", "unused.safetensors"])
    assert "add --latent" in capsys.readouterr().err


@needs_data
def test_training_cli_writes_the_parameterisation_it_trained(tmp_path):
    out = tmp_path / "v.safetensors"
    train_networks_main(["unet", "--parameterisation", "v", "--steps", "2", "--batch-size", "8", "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["parameterisation"] == "v"
    assert load_denoiser(out, parameterisation="v").parameterisation == "v"


@needs_data
@pytest.mark.parametrize(
    ("architecture", "parameterisation"), [("dit", "flow"), ("small-dit", "eps"), ("attention-unet", "flow")]
)
def test_training_cli_trains_a_latent_network(tmp_path, architecture, parameterisation):
    out = tmp_path / "net.safetensors"
    arguments = [architecture, "--latent", "--parameterisation", parameterisation, "--steps", "2", "--batch-size", "4"]
    train_networks_main([*arguments, "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        assert {key: f.metadata()[key] for key in ("architecture", "parameterisation", "space")} == {
            "architecture": architecture,
            "parameterisation": parameterisation,
            "space": "latent",
        }
    assert load_denoiser(out, architecture, parameterisation, latent=True).architecture == architecture
