"""Exact Gaussian-mixture test beds: the denoiser E[x0 | x] in closed form, no training, no data.

Data x0 ~ sum_k w_k N(mu_k, Sigma_k) with low-rank covariances Sigma_k = U_k diag(lambda_k) U_k^T + tau_k^2 I
(U_k: d x r, orthonormal columns). Noising x = a x0 + b eps: a = 1, b = sigma (eps) or a = 1 - s, b = s (flow).
Then x | k ~ N(a mu_k, C_k) with C_k = a^2 Sigma_k + b^2 I, whose eigenvalues are e = a^2 (lambda + tau^2) + b^2
on span U_k and f = a^2 tau^2 + b^2 off it, so the posterior over components and the posterior mean

    D(x) = sum_k r_k(x) [mu_k + a Sigma_k C_k^-1 (x - a mu_k)]

cost a few matmuls (formulas and checks: shared/testbeds.md, section 1.1). A class is a subset of the
components (component k belongs to class k mod num_classes); the guided denoiser is
D_u + w (D_c - D_u) with D_u the full mixture and D_c the class's mixture.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ...solver import check_choice
from .base import TestBed

VECTOR_SEED, IMAGE_SEED = 20251, 20252  # fixed: every machine builds the same mixtures


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture parameters over flattened vectors of dimension d (float64 master copy)."""

    means: Tensor  # [K, d]
    bases: Tensor  # [K, d, r], orthonormal columns
    eigenvalues: Tensor  # [K, r], lambda: variance along the basis beyond the floor
    floors: Tensor  # [K], tau^2: isotropic variance
    weights: Tensor  # [K], sums to 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def components(self) -> int:
        return self.means.shape[0]

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        return replace(self, **{name: getattr(self, name).to(dtype) for name in self.__dataclass_fields__})

    def covariance(self, k: int) -> Tensor:
        """Full covariance of component k (for checks only; the denoiser never forms it)."""
        basis, identity = self.bases[k], torch.eye(self.dim, dtype=self.means.dtype)
        return basis @ torch.diag(self.eigenvalues[k]) @ basis.T + self.floors[k] * identity

    def sample(self, components: Tensor, generator: torch.Generator) -> Tensor:
        """One draw x0 per entry of ``components`` (component indices), shape [n, d]."""
        count, rank, dtype = len(components), self.bases.shape[2], self.means.dtype
        along = torch.randn(count, rank, generator=generator, dtype=dtype) * self.eigenvalues[components].sqrt()
        floor = torch.randn(count, self.dim, generator=generator, dtype=dtype)
        return (
            self.means[components]
            + torch.einsum("ndr,nr->nd", self.bases[components], along)
            + floor * self.floors[components].sqrt().unsqueeze(1)
        )

    def log_joint(self, x: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """log(w_k N(x; a mu_k, C_k)) [n, K] and the basis projections U_k^T (x - a mu_k) [n, K, r].

        ``a`` and ``b`` have shape [n, 1].
        """
        count, components, rank = x.shape[0], self.components, self.bases.shape[2]
        flat_bases = self.bases.permute(1, 0, 2).reshape(self.dim, components * rank)  # [d, K*r]
        mean_projections = torch.einsum("kdr,kd->kr", self.bases, self.means)  # [K, r]
        projections = (x @ flat_bases).view(count, components, rank) - a.unsqueeze(2) * mean_projections
        squared = (
            (x * x).sum(1, keepdim=True) - 2 * a * (x @ self.means.T) + a * a * (self.means * self.means).sum(1)
        )  # |x - a mu_k|^2, [n, K]
        along = a.unsqueeze(2) ** 2 * (self.eigenvalues + self.floors.unsqueeze(1)) + b.unsqueeze(2) ** 2  # e
        off = a * a * self.floors + b * b  # f, [n, K]
        mahalanobis = squared / off + (projections**2 * (1 / along - 1 / off.unsqueeze(2))).sum(2)
        log_det = along.log().sum(2) + (self.dim - rank) * off.log()
        log_joint = self.weights.log() - 0.5 * (mahalanobis + log_det + self.dim * math.log(2 * math.pi))
        return log_joint, projections

    def posterior_means(self, x: Tensor, a: Tensor, b: Tensor, responsibilities: Tensor, projections: Tensor) -> Tensor:
        """sum_k r_k [mu_k + a Sigma_k C_k^-1 (x - a mu_k)] for given responsibilities r [n, K], all as matmuls."""
        count, components, rank = responsibilities.shape[0], self.components, self.bases.shape[2]
        off = a * a * self.floors + b * b  # [n, K]
        along = a.unsqueeze(2) ** 2 * (self.eigenvalues + self.floors.unsqueeze(1)) + b.unsqueeze(2) ** 2
        off_gain = responsibilities * self.floors / off  # r_k tau^2 / f
        along_gain = (self.eigenvalues + self.floors.unsqueeze(1)) / along - (self.floors / off).unsqueeze(2)
        flat_bases = self.bases.permute(1, 0, 2).reshape(self.dim, components * rank)
        along_terms = (responsibilities.unsqueeze(2) * along_gain * projections).reshape(count, components * rank)
        return (
            responsibilities @ self.means
            + a * (x * off_gain.sum(1, keepdim=True) - a * (off_gain @ self.means))
            + a * (along_terms @ flat_bases.T)
        )


def vector_mixture(dim: int = 64, components: int = 10, rank: int = 4, seed: int = VECTOR_SEED) -> GaussianMixture:
    """The vector bed's mixture: random means (std 0.9), random low-rank directions, unequal weights."""
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda low, high, *size: low + (high - low) * torch.rand(*size, generator=generator, dtype=torch.float64)  # noqa: E731
    means = 0.9 * torch.randn(components, dim, generator=generator, dtype=torch.float64)
    bases = torch.linalg.qr(torch.randn(components, dim, rank, generator=generator, dtype=torch.float64)).Q
    weights = uniform(0.5, 1.5, components)
    return GaussianMixture(
        means=means,
        bases=bases,
        eigenvalues=uniform(0.016, 0.58, components, rank),
        floors=uniform(0.05, 0.15, components) ** 2,
        weights=weights / weights.sum(),
    )


def _dct_basis(size: int, frequencies: int) -> Tensor:
    """Orthonormal 2-D DCT-II modes (u, v < frequencies) on a size x size grid: [frequencies^2, size*size]."""
    position = torch.arange(size, dtype=torch.float64) + 0.5
    modes_1d = torch.stack([torch.cos(math.pi * u * position / size) for u in range(frequencies)])
    modes_1d = modes_1d / modes_1d.norm(dim=1, keepdim=True)
    return torch.einsum("ux,vy->uvxy", modes_1d, modes_1d).reshape(frequencies * frequencies, size * size)


def _pattern(kind: int, size: int, generator: torch.Generator) -> Tensor:
    """One channel of a structured mean: stripes, a checkerboard, a blob or a gradient, [size, size]."""
    rand = lambda: float(torch.rand((), generator=generator, dtype=torch.float64))  # noqa: E731
    grid = torch.arange(size, dtype=torch.float64)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    if kind == 0:
        angle, frequency, phase = math.pi * rand(), 1 + 2 * rand(), 2 * math.pi * rand()
        along = x * math.cos(angle) + y * math.sin(angle)
        return 0.8 * torch.sin(2 * math.pi * frequency * along / size + phase)
    if kind == 1:
        block = 2 + int(3 * rand())
        return 0.7 * (1 - 2 * (((x // block) + (y // block)) % 2))
    if kind == 2:
        centre_x, centre_y, width = size * (0.2 + 0.6 * rand()), size * (0.2 + 0.6 * rand()), 2 + 2 * rand()
        sign = 1 if rand() < 0.5 else -1
        return sign * 1.5 * torch.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * width**2))
    angle = 2 * math.pi * rand()
    along = (x - size / 2) * math.cos(angle) + (y - size / 2) * math.sin(angle)
    return 0.9 * along / (size / 2)


def image_mixture(
    channels: int = 4, size: int = 16, components: int = 16, rank: int = 8, seed: int = IMAGE_SEED
) -> GaussianMixture:
    """The image-like bed's mixture: structured per-channel means, variation on low-frequency DCT modes."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.stack(
        [
            torch.stack([_pattern((k + c) % 4, size, generator) for c in range(channels)]).flatten()
            for k in range(components)
        ]
    )
    dct = _dct_basis(size, 4)  # [16, size*size]: modes with u, v <= 3
    low_frequency = torch.block_diag(*[dct] * channels)  # [channels*16, d]: orthonormal rows
    gaussian = torch.randn(components, low_frequency.shape[0], rank, generator=generator, dtype=torch.float64)
    mixing = torch.linalg.qr(gaussian).Q
    bases = torch.einsum("md,kmr->kdr", low_frequency, mixing)
    eigenvalues = 1 + 17 * torch.rand(components, rank, generator=generator, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=generator, dtype=torch.float64)
    return GaussianMixture(
        means=means,
        bases=bases,
        eigenvalues=eigenvalues,
        floors=torch.full((components,), 0.05**2, dtype=torch.float64),
        weights=weights / weights.sum(),
    )


class GMMTestBed(TestBed):
    """A Gaussian-mixture bed with the exact (optionally class-conditional, CFG-guided) denoiser."""

    def __init__(
        self,
        name: str,
        mixture: GaussianMixture,
        shape: tuple[int, ...],
        kind: str,
        num_classes: int | None = None,
        guidance: float = 1.0,
    ):
        check_choice("model kind", kind, ("eps", "flow"))
        if math.prod(shape) != mixture.dim:
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements, the mixture has dimension {mixture.dim}")
        if num_classes is not None and not 1 <= num_classes <= mixture.components:
            raise ValueError(f"num_classes must be in 1..{mixture.components}, got {num_classes}")
        self.name, self.shape = name, shape
        self.model_family = f"gmm-{kind}"
        self.num_classes, self.guidance = num_classes, guidance
        self.mixture = mixture
        self._by_dtype = {torch.float64: mixture, torch.float32: mixture.to(torch.float32)}

    def identity(self) -> str:
        """The base identity plus a digest of the mixture parameters (they come from code, which may change)."""
        digest = hashlib.sha256()
        for name in self.mixture.__dataclass_fields__:
            digest.update(getattr(self.mixture, name).contiguous().numpy().tobytes())
        return f"{super().identity()}|mixture={digest.hexdigest()[:16]}"

    def class_mask(self, labels: Tensor) -> Tensor:
        """[n, K] boolean: which components belong to each label's class."""
        components = torch.arange(self.mixture.components)
        return components.unsqueeze(0) % self.num_classes == labels.unsqueeze(1).cpu()

    def noising(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) of x = a x0 + b eps for a batch of sigmas, each [n, 1]."""
        sigma = sigma.reshape(-1, 1)
        if self.kind == "flow":
            return 1 - sigma, sigma
        return torch.ones_like(sigma), sigma

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        mixture = self._by_dtype[x.dtype]
        flat = x.reshape(x.shape[0], -1)
        a, b = self.noising(sigma.to(x.dtype).expand(x.shape[0]))
        log_joint, projections = mixture.log_joint(flat, a, b)
        unconditional = mixture.posterior_means(flat, a, b, log_joint.softmax(dim=1), projections)
        if labels is None or self.num_classes is None:
            return unconditional.reshape(x.shape)
        masked = log_joint.masked_fill(~self.class_mask(labels), -math.inf)
        conditional = mixture.posterior_means(flat, a, b, masked.softmax(dim=1), projections)
        return (unconditional + self.guidance * (conditional - unconditional)).reshape(x.shape)

    def component_weights(self, labels: Tensor | None, count: int) -> Tensor:
        """p(k | label) per sample, [count, K] (the prior when unconditional)."""
        weights = self.mixture.weights.expand(count, -1)
        if labels is None or self.num_classes is None:
            return weights
        weights = weights * self.class_mask(labels)
        return weights / weights.sum(dim=1, keepdim=True)

    def sample_data(self, labels: Tensor | None, count: int, generator: torch.Generator) -> Tensor:
        """True data x0 (conditional on labels where given), float32, [count, *shape]."""
        components = torch.multinomial(self.component_weights(labels, count), 1, generator=generator).squeeze(1)
        return self.mixture.sample(components, generator).float().reshape(count, *self.shape)


GMM_BEDS = {
    f"gmm-{geometry}-{kind}{suffix}": (geometry, kind, suffix == "-cfg")
    for geometry in ("vector", "image")
    for kind in ("eps", "flow")
    for suffix in ("", "-cfg")
}
GMM_CLASSES = {"vector": 5, "image": 4}
DEFAULT_GUIDANCE = 3.0


def gmm_testbed(name: str, guidance: float = DEFAULT_GUIDANCE) -> GMMTestBed:
    """Build one of ``GMM_BEDS``: ``gmm-{vector,image}-{eps,flow}[-cfg]``; ``-cfg`` beds use CFG scale ``guidance``."""
    check_choice("GMM bed", name, tuple(GMM_BEDS))
    geometry, kind, conditional = GMM_BEDS[name]
    mixture, shape = (vector_mixture(), (64,)) if geometry == "vector" else (image_mixture(), (4, 16, 16))
    return GMMTestBed(
        name,
        mixture,
        shape,
        kind,
        num_classes=GMM_CLASSES[geometry] if conditional else None,
        guidance=guidance if conditional else 1.0,
    )
