"""Metric functions on inputs with known answers."""

import math

import numpy as np
import pytest
import torch

from consistency_solver.training.evaluation.metrics import (
    consistency_rmse,
    frechet_distance,
    gmm_quality,
    label_agreement,
    mode_assignments,
    mode_tv,
    psnr,
    rmse_per_sample,
    sliced_wasserstein,
    ssim,
)
from consistency_solver.training.testbeds import get_testbed

torch.set_num_threads(1)  # the cores are shared; one thread is faster than two contended ones


def images(count=3, size=28, seed=0):
    return torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_rmse_of_a_constant_offset():
    a = torch.zeros(2, 4, 4)
    b = torch.cat([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 1.5)])
    assert torch.allclose(rmse_per_sample(a, b), torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert math.isclose(consistency_rmse(a, b), math.sqrt((0.25 + 2.25) / 2))
    assert consistency_rmse(b, b) == 0


def test_psnr_follows_its_definition():
    a = images()
    b = a + 0.1
    # PSNR = 10 log10(range^2 / MSE) = 10 log10(4 / 0.01) = 26.02 dB for data in [-1, 1].
    assert torch.allclose(psnr(b, a, data_range=2.0), torch.full((3,), 10 * math.log10(400), dtype=torch.float64))


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    a = images()
    noisy = a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim(a, a, data_range=2.0), torch.ones(3, dtype=torch.float64))
    assert (ssim(noisy, a, data_range=2.0) < 0.9).all()


def test_ssim_refuses_small_images():
    with pytest.raises(ValueError, match="28x28"):
        ssim(images(size=16), images(size=16), data_range=2.0)


def test_sliced_wasserstein_of_a_shift_and_of_identical_sets():
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(500, 8, generator=generator)
    assert sliced_wasserstein(points, points, generator) == 0
    # Shifting every point by t along e_0 moves each projection on direction u by t u_0; E[u_0^2] = 1/d.
    shifted = points + torch.tensor([1.0] + [0.0] * 7)
    assert math.isclose(sliced_wasserstein(shifted, points, generator, projections=4000), math.sqrt(1 / 8), rel_tol=0.1)


def test_gmm_quality_separates_true_samples_from_collapsed_ones():
    bed = get_testbed("gmm-vector-eps-cfg")
    generator = torch.Generator().manual_seed(3)
    labels = bed.sample_labels(512, generator)
    true_samples = bed.sample_data(labels, 512, generator)
    assert torch.equal(
        mode_assignments(bed.mixture.means.float(), bed), torch.arange(bed.mixture.components)
    )  # each mean belongs to its own mode
    collapsed = bed.mixture.means[torch.zeros(512, dtype=torch.long)].float()  # everything in mode 0
    good, bad = gmm_quality(true_samples, bed, labels), gmm_quality(collapsed, bed, labels)
    assert good["mode_tv"] < 0.1 < 0.5 < bad["mode_tv"]
    assert good["sliced_w2"] < 0.5 * bad["sliced_w2"]
    assert mode_tv(true_samples, bed, labels) == good["mode_tv"]


def test_frechet_distance_of_gaussians_with_known_answer():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(20_000, 4, generator=generator, dtype=torch.float64)
    b = 2 * torch.randn(20_000, 4, generator=generator, dtype=torch.float64) + 1
    # FD(N(0, I), N(1, 4I)) = |1|^2 * 4 + trace(I + 4I - 2 * 2I) = 4 + 4 = 8.
    assert math.isclose(frechet_distance(a, b), 8.0, rel_tol=0.05)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_frechet_distance_agrees_with_the_matrix_square_root_and_stays_finite_on_singular_covariances():
    from scipy import linalg

    generator = torch.Generator().manual_seed(5)
    mixing = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = torch.randn(500, 6, generator=generator, dtype=torch.float64) @ mixing
    b = torch.randn(500, 6, generator=generator, dtype=torch.float64) @ mixing.T + 0.5
    cov_a, cov_b = (np.cov(x.numpy(), rowvar=False) for x in (a, b))
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(
        cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real
    )
    assert math.isclose(frechet_distance(a, b), expected, rel_tol=1e-9)
    # Fewer samples than features, as on a small benchmark run: rank-deficient covariances.
    few_a, few_b = a[:4] @ torch.ones(6, 64, dtype=torch.float64), b[:5] @ torch.ones(6, 64, dtype=torch.float64)
    assert math.isfinite(frechet_distance(few_a, few_b)) and frechet_distance(few_a, few_b) >= -1e-9


def test_label_agreement():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert label_agreement(logits, torch.tensor([0, 1, 1, 1])) == 0.75
