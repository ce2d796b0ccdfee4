"""The Gaussian-mixture beds: exact denoiser (brute force and Monte Carlo), CFG, the shared interface."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from consistency_solver.training.testbeds import TESTBED_NAMES, get_testbed
from consistency_solver.training.testbeds.base import EPS_SIGMA_MAX, EPS_SIGMA_MIN
from consistency_solver.training.testbeds.gmm import GaussianMixture, GMMTestBed, image_mixture, vector_mixture

torch.set_num_threads(1)  # the cores are shared; one thread is faster than two contended ones
GMM_NAMES = [name for name in TESTBED_NAMES if name.startswith("gmm-")]


def tiny_mixture() -> GaussianMixture:
    """A 2-d, 3-component mixture: small enough for Monte-Carlo posterior means at any noise level."""
    bases = torch.tensor([[[1.0], [0.0]], [[0.6], [0.8]], [[0.0], [1.0]]], dtype=torch.float64)
    return GaussianMixture(
        means=torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], dtype=torch.float64),
        bases=bases,
        eigenvalues=torch.tensor([[0.5], [0.2], [0.3]], dtype=torch.float64),
        floors=torch.tensor([0.04, 0.01, 0.02], dtype=torch.float64),
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    )


def monte_carlo_posterior_mean(
    mixture: GaussianMixture, x: torch.Tensor, a: float, b: float, components: torch.Tensor | None, draws: int
) -> torch.Tensor:
    """Self-normalised importance sampling of E[x0 | x] with the prior (optionally one class's components)."""
    generator = torch.Generator().manual_seed(0)
    weights = mixture.weights if components is None else mixture.weights * components
    picked = torch.multinomial(weights, draws, replacement=True, generator=generator)
    x0 = mixture.sample(picked, generator)  # [draws, d]
    log_likelihood = -((x.unsqueeze(1) - a * x0.unsqueeze(0)) ** 2).sum(2) / (2 * b * b)  # [n, draws]
    return log_likelihood.softmax(dim=1) @ x0


@pytest.mark.parametrize("kind, sigma", [("eps", 0.3), ("eps", 1.0), ("eps", 4.0), ("flow", 0.3), ("flow", 0.8)])
def test_denoiser_matches_monte_carlo_posterior_mean(kind, sigma):
    bed = GMMTestBed("tiny", tiny_mixture(), (2,), kind, num_classes=2, guidance=3.0)
    a, b = (1.0, sigma) if kind == "eps" else (1 - sigma, sigma)
    x = torch.tensor([[0.0, 0.0], [1.2, -0.4], [-2.0, 1.0]], dtype=torch.float64) * max(a, b)
    sigmas = torch.full((3,), sigma, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    unconditional = monte_carlo_posterior_mean(bed.mixture, x, a, b, None, 400_000)
    class_zero = monte_carlo_posterior_mean(bed.mixture, x, a, b, bed.class_mask(torch.tensor([0]))[0], 400_000)
    class_one = monte_carlo_posterior_mean(bed.mixture, x, a, b, bed.class_mask(torch.tensor([1]))[0], 400_000)
    conditional = torch.stack([class_zero[0], class_one[1], class_zero[2]])
    guided = unconditional + 3.0 * (conditional - unconditional)
    assert torch.allclose(bed.denoise(x, sigmas, None), unconditional, atol=0.02)
    assert torch.allclose(bed.denoise(x, sigmas, labels), guided, atol=0.06)


@pytest.mark.parametrize(
    "bed",
    [
        get_testbed("gmm-vector-eps"),
        # The image construction at 2x8x8 (a 1024-d full covariance makes the brute force slow).
        GMMTestBed("small-image-flow", image_mixture(channels=2, size=8, components=5), (2, 8, 8), "flow"),
    ],
    ids=["vector-eps", "small-image-flow"],
)
def test_denoiser_matches_brute_force_full_covariance(bed):
    mixture = bed.mixture
    generator = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(3, mixture.dim, generator=generator, dtype=torch.float64)
    for sigma in (0.05, 0.7, 0.95 if bed.kind == "flow" else 5.0):
        a, b = (1.0, sigma) if bed.kind == "eps" else (1 - sigma, sigma)
        log_joint, means = [], []
        for k in range(mixture.components):
            covariance = mixture.covariance(k)
            marginal = a * a * covariance + b * b * torch.eye(mixture.dim, dtype=torch.float64)
            log_joint.append(mixture.weights[k].log() + MultivariateNormal(a * mixture.means[k], marginal).log_prob(x))
            gain = covariance @ torch.linalg.solve(marginal, (x - a * mixture.means[k]).T)
            means.append(mixture.means[k] + a * gain.T)
        expected = (torch.stack(log_joint, 1).softmax(1).unsqueeze(2) * torch.stack(means, 1)).sum(1)
        denoised = bed.denoise(x.reshape(3, *bed.shape), torch.full((3,), sigma, dtype=torch.float64), None)
        assert torch.allclose(denoised.reshape(3, -1), expected, atol=1e-9)


def test_guidance_one_gives_the_class_conditional_denoiser():
    unguided = GMMTestBed("v", vector_mixture(), (64,), "eps", num_classes=5, guidance=1.0)
    only_class = GMMTestBed("v", vector_mixture(), (64,), "eps")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.full((4,), 0.8, dtype=torch.float64)
    labels = torch.tensor([3, 3, 3, 3])
    restricted = only_class.mixture.weights * unguided.class_mask(labels)[0]
    only_class.mixture = GaussianMixture(
        only_class.mixture.means,
        only_class.mixture.bases,
        only_class.mixture.eigenvalues,
        only_class.mixture.floors,
        restricted / restricted.sum(),
    )
    only_class._by_dtype[torch.float64] = only_class.mixture
    # Zero-weight components make log(0) = -inf logits, which softmax turns into exact zeros.
    assert torch.allclose(unguided.denoise(x, sigma, labels), only_class.denoise(x, sigma, None), atol=1e-12)


@pytest.mark.parametrize("name", GMM_NAMES)
def test_bed_interface(name):
    bed = get_testbed(name)
    assert bed.model_family in ("gmm-eps", "gmm-flow") and bed.kind in ("eps", "flow")
    assert name.endswith("-cfg") == (bed.num_classes is not None) == (bed.guidance == 3.0)
    generator = torch.Generator().manual_seed(3)
    noise, labels = bed.noise(5, generator), bed.sample_labels(5, generator)
    assert noise.shape == (5, *bed.shape) and noise.dtype == torch.float32
    sigmas = bed.sigmas(6)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 7 and sigmas[-1] == 0
    if bed.kind == "eps":
        assert math.isclose(sigmas[0], EPS_SIGMA_MAX) and math.isclose(sigmas[-2], EPS_SIGMA_MIN, rel_tol=1e-9)
    else:
        assert sigmas[0] == 1
    x = bed.initial_state(noise, sigmas)
    assert torch.allclose(x, noise * float(sigmas[0]))
    denoised = bed.model(labels)(x, sigmas[0].float() * torch.ones(5))
    assert denoised.shape == x.shape and denoised.dtype == torch.float32 and torch.isfinite(denoised).all()
    as_double = bed.denoise(x.double(), sigmas[0] * torch.ones(5, dtype=torch.float64), labels)
    assert torch.allclose(denoised.double(), as_double, atol=1e-3)  # float32 at sigma_max, d = 1024


def test_beds_are_identical_on_every_build():
    first, second = get_testbed("gmm-image-eps-cfg"), get_testbed("gmm-image-flow")
    assert torch.equal(first.mixture.means, second.mixture.means)
    assert torch.equal(first.mixture.bases, second.mixture.bases)


def test_sample_data_follows_the_mixture():
    bed = get_testbed("gmm-vector-eps-cfg")
    labels = torch.full((20_000,), 2)
    samples = bed.sample_data(labels, 20_000, torch.Generator().manual_seed(4)).double()
    weights = bed.component_weights(labels[:1], 1)[0]
    assert torch.allclose(samples.mean(0), weights @ bed.mixture.means, atol=0.03)


def test_unknown_bed_names_the_known_ones():
    with pytest.raises(ValueError, match="gmm-vector-eps"):
        get_testbed("gmm-nonsense")
