"""Metrics that need no downloaded weights.

- Consistency of a preview with its reference final from the same noise and label: RMSE, PSNR, SSIM
  (torchmetrics; SSIM only for images of at least 28x28, where its 11x11 window means something).
- Gaussian-mixture quality: sliced Wasserstein-2 distance to true samples and the total-variation
  distance between the samples' mode histogram and the mixture weights.
- Learned-model quality: Frechet distance in a classifier's feature space and the
  classifier's agreement with the conditioning label.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..testbeds.gmm import GMMTestBed

SSIM_MIN_SIZE = 28


def rmse_per_sample(previews: Tensor, references: Tensor) -> Tensor:
    """Root-mean-square difference of each sample, [n] (float64)."""
    difference = (previews.double() - references.double()).flatten(1)
    return difference.pow(2).mean(dim=1).sqrt()


def consistency_rmse(previews: Tensor, references: Tensor) -> float:
    """RMSE over all samples and elements: the benchmark's consistency number (lower is better)."""
    return float(rmse_per_sample(previews, references).pow(2).mean().sqrt())


def psnr(previews: Tensor, references: Tensor, data_range: float) -> Tensor:
    """Peak signal-to-noise ratio in dB of each sample, [n]; ``data_range`` is max - min of the data (2 for [-1, 1])."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    dims = tuple(range(1, previews.dim()))
    return peak_signal_noise_ratio(
        previews.double(), references.double(), data_range=data_range, reduction="none", dim=dims
    )


def ssim(previews: Tensor, references: Tensor, data_range: float) -> Tensor:
    """Structural similarity of each image, [n]; images are [n, C, H, W] with H, W >= 28."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if previews.dim() != 4 or min(previews.shape[-2:]) < SSIM_MIN_SIZE:
        raise ValueError(
            f"SSIM needs images [n, C, H, W] of at least {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE}, got {tuple(previews.shape)}; "
            "use rmse_per_sample or psnr for small latents and vectors"
        )
    return structural_similarity_index_measure(
        previews.double(), references.double(), data_range=data_range, reduction="none"
    )


def sliced_wasserstein(samples: Tensor, targets: Tensor, generator: torch.Generator, projections: int = 256) -> float:
    """Sliced Wasserstein-2 distance between two equally sized sample sets (flattened), by sorting projections."""
    if samples.shape != targets.shape:
        raise ValueError(f"sample sets must have equal shapes, got {tuple(samples.shape)} and {tuple(targets.shape)}")
    samples, targets = samples.flatten(1).double(), targets.flatten(1).double()
    directions = torch.randn(samples.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_samples = (samples @ directions).sort(dim=0).values
    projected_targets = (targets @ directions).sort(dim=0).values
    return float((projected_samples - projected_targets).pow(2).mean().sqrt())


def mode_assignments(samples: Tensor, bed: GMMTestBed) -> Tensor:
    """The most likely mixture component of each clean sample, [n]."""
    flat = samples.flatten(1).double()
    ones, zeros = torch.ones(len(flat), 1, dtype=torch.float64), torch.zeros(len(flat), 1, dtype=torch.float64)
    log_joint, _ = bed.mixture.log_joint(flat, ones, zeros)
    return log_joint.argmax(dim=1)


def mode_tv(samples: Tensor, bed: GMMTestBed, labels: Tensor | None) -> float:
    """Total variation between the samples' mode histogram and p(k | label) averaged over the batch (0 = perfect)."""
    components = bed.mixture.components
    histogram = torch.bincount(mode_assignments(samples, bed), minlength=components).double() / len(samples)
    expected = bed.component_weights(labels, len(samples)).mean(dim=0)
    return float(0.5 * (histogram - expected).abs().sum())


def gmm_quality(samples: Tensor, bed: GMMTestBed, labels: Tensor | None, seed: int = 0) -> dict[str, float]:
    """Sliced W2 to fresh true samples with the same labels, and the mode-histogram TV."""
    generator = torch.Generator().manual_seed(seed)
    targets = bed.sample_data(labels, len(samples), generator)
    return {
        "sliced_w2": sliced_wasserstein(samples, targets, generator),
        "mode_tv": mode_tv(samples, bed, labels),
    }


def frechet_distance(features: Tensor, target_features: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, f] (the FID formula, any features).

    trace(sqrt(cov_a @ cov_b)) is taken as the sum of the square roots of the eigenvalues of the symmetric
    sqrt(cov_a) @ cov_b @ sqrt(cov_a), which has the same spectrum: symmetric eigensolvers stay exact on the
    singular, ill-conditioned covariances of few samples, where a general matrix square root can fail."""
    a, b = features.double().cpu().numpy(), target_features.double().cpu().numpy()
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_root = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def label_agreement(logits: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose classifier prediction equals the conditioning label."""
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())
