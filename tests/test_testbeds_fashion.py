"""The Fashion-MNIST test bed: data loader, shipped UNet and classifier, guidance, sampling quality, training CLI,
quality check."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from safetensors import safe_open

from consistency_solver.training.evaluation.fashion_quality import evaluate
from consistency_solver.training.evaluation.references import held_out_seeds, reference_finals, seeded_batch
from consistency_solver.training.testbeds import FASHION_BEDS, get_testbed
from consistency_solver.training.testbeds.fashion import (
    CLASSIFIER_WEIGHTS,
    DATA_DIR,
    UNET_WEIGHTS,
    FashionTestBed,
    load_classifier,
    load_denoiser,
    load_fashion_mnist,
)
from consistency_solver.training.testbeds.train_networks import main as train_networks_main

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST missing: install the Debian package dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def bed() -> FashionTestBed:
    return FashionTestBed()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def real_test_set():
    return load_fashion_mnist("test")


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_loader_scales_to_minus_one_one_and_keeps_order(tmp_path):
    pixels = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 0, 9]))
    images, labels = load_fashion_mnist("test", data_dir=tmp_path)
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == [7, 0, 9]
    assert torch.equal(images[:, 0], torch.from_numpy(pixels).float() / 127.5 - 1)


def test_missing_data_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", data_dir=tmp_path)


@needs_data
def test_real_splits_have_fashion_mnist_shapes_and_balanced_labels(real_test_set):
    images, labels = real_test_set
    assert images.shape == (10000, 1, 28, 28)
    assert images.min() == -1 and images.max() == 1
    assert torch.bincount(labels).tolist() == [1000] * 10
    train_images, train_labels = load_fashion_mnist("train")
    assert train_images.shape == (60000, 1, 28, 28)
    assert torch.bincount(train_labels).tolist() == [6000] * 10


def test_bed_is_registered_and_follows_the_interface(bed):
    assert get_testbed("fashion-eps-cfg").identity() == bed.identity()
    assert (bed.name, bed.model_family, bed.kind, bed.shape, bed.guidance) == (
        "fashion-eps-cfg",
        "fashion-eps",
        "eps",
        (1, 28, 28),
        3.0,
    )
    sigmas = bed.sigmas(10)
    assert sigmas.dtype == torch.float64 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(14.6146, abs=1e-3) and sigmas[-2].item() == pytest.approx(0.0292, abs=1e-3)
    generator = torch.Generator().manual_seed(0)
    noise, labels = bed.noise(4, generator), bed.sample_labels(4, generator)
    denoised = bed.model(labels)(bed.initial_state(noise, sigmas), sigmas[0] * torch.ones(4))
    assert denoised.shape == (4, 1, 28, 28) and denoised.dtype == torch.float32
    assert torch.isfinite(denoised).all()
    assert bed.denoise(noise.double(), sigmas[3] * torch.ones(4), labels).dtype == torch.float64


def test_guidance_combines_conditional_and_unconditional_predictions(bed):
    generator = torch.Generator().manual_seed(1)
    x, labels = 2.0 * bed.noise(6, generator), bed.sample_labels(6, generator)
    sigma = torch.full((6,), 2.0)
    conditional, unconditional = bed.network(x, sigma, labels), bed.network(x, sigma, None)
    assert not torch.allclose(conditional, unconditional, atol=1e-3), "the class label must matter"
    assert torch.allclose(FashionTestBed(guidance=1.0).denoise(x, sigma, labels), conditional, atol=1e-5)
    expected = unconditional + 3.0 * (conditional - unconditional)
    assert torch.allclose(bed.denoise(x, sigma, labels), expected, atol=1e-4)
    assert torch.allclose(bed.denoise(x, sigma, None), unconditional, atol=1e-5)


@needs_data
def test_denoiser_at_tiny_sigma_returns_nearly_its_input(bed, real_test_set):
    images = real_test_set[0][:16]
    sigma = torch.full((16,), 1e-3)
    noisy = images + sigma.reshape(-1, 1, 1, 1) * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    denoised = bed.network(noisy, sigma, real_test_set[1][:16])
    assert (denoised - noisy).abs().max() < 1e-2


@needs_data
def test_classifier_is_accurate_on_real_test_images(classifier, real_test_set):
    images, labels = real_test_set
    with torch.no_grad():
        accuracy = (classifier(images[:500]).argmax(1) == labels[:500]).float().mean().item()
        features = classifier.features(images[:8])
    assert accuracy >= 0.85
    assert features.shape == (8, 64)


@pytest.mark.parametrize("name", FASHION_BEDS)
def test_twenty_step_samples_show_their_class(name, classifier):
    bed = get_testbed(name)
    noise, labels = seeded_batch(bed, held_out_seeds(64))
    samples = reference_finals(bed, noise, labels, method="multistep", steps=20)
    assert torch.isfinite(samples).all()
    with torch.no_grad():
        accuracy = (classifier(bed.decode(samples).clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


@needs_data
def test_training_cli_writes_loadable_fp16_weights_with_metadata(tmp_path):
    out = tmp_path / "unet.safetensors"
    train_networks_main(["unet", "--seed", "3", "--steps", "2", "--batch-size", "8", "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert metadata["seed"] == "3" and metadata["steps"] == "2" and int(metadata["params"]) > 10**6
    load_denoiser(out)


@needs_data
def test_the_quality_check_scores_samples_and_writes_the_grid(tmp_path):
    grid = tmp_path / "samples.png"
    results = evaluate(UNET_WEIGHTS, CLASSIFIER_WEIGHTS, samples=20, sample_steps=10, guidance=3.0, grid=grid)
    assert results["label_accuracy"] > 0.5  # chance is 0.1
    assert results["frechet_real_vs_real"] > 0 and results["frechet_samples_vs_real"] > 0
    assert grid.is_file()
