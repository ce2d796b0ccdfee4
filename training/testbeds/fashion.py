"""Fashion-MNIST test beds: small class-conditional denoisers (two UNet layouts and two DiT sizes) trained in four
parameterisations, on the images or on a fixed linear latent of them, and a feature classifier, each trained once and
shipped.

The denoisers are trained by ``training/testbeds/train_networks.py`` and their EMA weights ship in
``training/testbeds/weights/``. Each parameterisation is a ComfyUI model type, and ``denoise`` returns x0 in its
model space (the latent, for a latent bed), so every sampler of the pack runs on all of them unchanged:

- ``edm`` (bed ``fashion-eps-cfg``): ComfyUI EPS space, x = x0 + sigma * eps, with Karras et al. (2022)
  preconditioning inside the network.
- ``flow`` (beds ``fashion-flow-cfg`` and ``fashion-dit-flow-cfg``): ComfyUI CONST (rectified flow, as SD3),
  x = (1 - sigma) * x0 + sigma * eps, the network predicts the velocity eps - x0 from the timestep 1000 * sigma, and
  the schedule is ``ModelSamplingDiscreteFlow`` with shift 3.
- ``v`` (bed ``fashion-v-cfg``): ComfyUI V_PREDICTION (as SD2-768) on SD1.x's discrete 1000-step schedule: the
  network sees x / sqrt(sigma^2 + 1) and the nearest discrete timestep, and predicts v.
- ``eps`` (beds ``fashion-latent-eps-cfg`` and ``fashion-dit-eps-cfg``): ComfyUI EPS on SD1.x's discrete schedule, as
  SD1.5: the same input and timestep as ``v``, the network predicts eps, and denoised = x - sigma * eps.

The latent beds (``fashion-latent-eps-cfg``, the UNet; ``fashion-dit-flow-cfg``, a DiT in the ``flow``
parameterisation; ``fashion-dit-eps-cfg``, a smaller DiT as EPS, as PixArt-alpha; ``fashion-latent-flow-cfg``, a
two-level UNet with attention at every 7x7 block, as a flow) work, as latent diffusion models do, on a 4x14x14 latent
that is not the image: ``encode_latent``
is a fixed invertible linear map (2x2 space-to-depth, a fixed orthogonal 4x4 channel mix, a per-channel shift and
scale) and ``decode_latent`` its exact inverse. The classifier gives the label-agreement and Frechet metrics, on
decoded images.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ...solver import check_choice
from ...solver.schedules import DiscreteSchedule
from .base import FLOW_SHIFT, TestBed

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_WEIGHTS = WEIGHTS_DIR / "fashion_unet.safetensors"
FLOW_UNET_WEIGHTS = WEIGHTS_DIR / "fashion_flow_unet.safetensors"
V_UNET_WEIGHTS = WEIGHTS_DIR / "fashion_v_unet.safetensors"
LATENT_EPS_UNET_WEIGHTS = WEIGHTS_DIR / "fashion_latent_eps_unet.safetensors"
DIT_FLOW_WEIGHTS = WEIGHTS_DIR / "fashion_dit_flow.safetensors"
DIT_EPS_WEIGHTS = WEIGHTS_DIR / "fashion_dit_eps.safetensors"
LATENT_FLOW_WEIGHTS = WEIGHTS_DIR / "fashion_latent_flow.safetensors"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "fashion_classifier.safetensors"
CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = 10
SIGMA_DATA = 0.5
PARAMETERISATIONS = ("edm", "flow", "v", "eps")
ARCHITECTURES = ("unet", "dit", "small-dit", "attention-unet")
# The transformers and the attention UNet take the 4x14x14 latent only (on 28x28 images their attention would cost
# too much on a CPU).
LATENT_ONLY = ("dit", "small-dit", "attention-unet")
# SD1.x's discrete schedule, which ComfyUI's ModelSamplingDiscrete computes for V_PREDICTION models too.
VP_SCHEDULE = DiscreteSchedule()
IMAGE_SHAPE = (1, 28, 28)
LATENT_SHAPE = (4, 14, 14)


# --- data -------------------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """One idx file (the MNIST format): big-endian magic (dtype code, ndim), the dims, then raw uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", data_dir: Path | str = DATA_DIR) -> tuple[Tensor, Tensor]:
    """Images [N, 1, 28, 28] float32 in [-1, 1] and labels [N] int64 of the ``train`` (60k) or ``test`` (10k) split."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be one of {sorted(prefixes)}, got {split!r}")
    data_dir = Path(data_dir)
    images_path = data_dir / f"{prefixes[split]}-images-idx3-ubyte.gz"
    labels_path = data_dir / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {data_dir}: install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist)"
        )
    images = torch.from_numpy(_read_idx(images_path).copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_path).copy()).long()
    return images, labels


# --- latent ------------------------------------------------------------------------------------------------------

LATENT_MIX_SEED = 14
# 1 / the per-channel std of the training set's mixed and shifted latents, so every latent channel has about unit std
# (the role of SD's scale_factor); measured once with the mix above and fixed here.
LATENT_SCALE = (0.9777, 2.0325, 1.4146, 2.2031)


def latent_mix() -> Tensor:
    """The fixed orthogonal 4x4 channel mix: Q of the QR of a seeded Gaussian matrix, with the signs that make R's
    diagonal positive (which makes Q unique, whatever the LAPACK)."""
    gaussian = torch.randn(4, 4, generator=torch.Generator().manual_seed(LATENT_MIX_SEED), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * r.diagonal().sign()


def _mixed(images: Tensor) -> Tensor:
    """2x2 space-to-depth (channel 2i + j holds pixel (2y + i, 2x + j)) then the fixed channel mix."""
    return torch.einsum("oc,bchw->bohw", latent_mix().to(images.dtype), F.pixel_unshuffle(images, 2))


def _latent_shift(dtype: torch.dtype) -> Tensor:
    """The mix of an all-black image: subtracting it makes the black background the zero latent (the role of Flux's
    shift_factor), so a channel's mean is that of the garments, not zero, as real latents' means are."""
    return _mixed(torch.full((1, *IMAGE_SHAPE), -1.0, dtype=dtype))[0, :, :1, :1]


def encode_latent(images: Tensor) -> Tensor:
    """[N, 1, 28, 28] images in [-1, 1] -> [N, 4, 14, 14] latents: (mix(space_to_depth(x)) - shift) * scale."""
    scale = torch.tensor(LATENT_SCALE, dtype=images.dtype).reshape(-1, 1, 1)
    return (_mixed(images) - _latent_shift(images.dtype)) * scale


def decode_latent(latents: Tensor) -> Tensor:
    """The exact inverse of ``encode_latent``: [N, 4, 14, 14] latents -> [N, 1, 28, 28] images."""
    scale = torch.tensor(LATENT_SCALE, dtype=latents.dtype).reshape(-1, 1, 1)
    mixed = latents / scale + _latent_shift(latents.dtype)
    return F.pixel_shuffle(torch.einsum("oc,bohw->bchw", latent_mix().to(latents.dtype), mixed), 2)


# --- networks ---------------------------------------------------------------------------------------------------


def edm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Karras et al. (2022) preconditioning: D(x) = c_skip x + c_out F(c_in x, c_noise), returns the four c's."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def flow_sigma(t: Tensor, shift: float = FLOW_SHIFT) -> Tensor:
    """ComfyUI's ``time_snr_shift``: the flow sigma at time t in [0, 1] (what ``ModelSamplingDiscreteFlow`` uses)."""
    return shift * t / (1 + (shift - 1) * t)


def timestep_feature(timestep: Tensor) -> Tensor:
    """ComfyUI's model timestep (0 .. 1000: 1000 * sigma for flow, the discrete index for V) mapped to [-1, 1]."""
    return timestep / 500 - 1


class FourierEmbedding(nn.Module):
    """sin/cos of c_noise at fixed geometric frequencies; c_noise (log(sigma)/4 or ``timestep_feature``) spans
    about [-1, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.logspace(0, 2, channels // 2), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding entering as a scale and shift of the second norm."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of the coarsest (7x7) level."""

    def __init__(self, channels: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, -1).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(batch, channels, height, width))


class FashionDenoiser(nn.Module):
    """A class-conditional denoiser D(x; sigma, label) = E[x0 | x] in one of ``PARAMETERISATIONS`` (see the module
    docstring): subclasses build the network ``raw(x, c_noise, labels)``, and ``forward(x, sigma, labels)`` reads it as
    the parameterisation's ComfyUI model type. Label ``num_classes`` is the "null" class used for classifier-free
    guidance (and for ``labels=None``). The parameterisation changes no weight shapes, only how the network is read.
    """

    architecture: str

    def __init__(self, parameterisation: str, num_classes: int):
        super().__init__()
        check_choice("parameterisation", parameterisation, PARAMETERISATIONS)
        self.parameterisation = parameterisation
        self.num_classes = num_classes

    def null_labels(self, count: int, device: torch.device | None = None) -> Tensor:
        return torch.full((count,), self.num_classes, dtype=torch.long, device=device)

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        """The network F of the preconditioned denoiser."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        if labels is None:
            labels = self.null_labels(x.shape[0], x.device)
        column = sigma.reshape(-1, 1, 1, 1)
        if self.parameterisation == "flow":
            # CONST: the input is x itself, the timestep 1000 * sigma, and denoised = x - sigma * velocity.
            return x - column * self.raw(x, timestep_feature(1000 * sigma), labels)
        if self.parameterisation in ("v", "eps"):
            # ModelSamplingDiscrete: input x / sqrt(sigma^2 + 1) and the nearest discrete timestep (as its
            # ``timestep``). V (sigma_data 1): denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1);
            # EPS: denoised = x - sigma * eps.
            timestep = VP_SCHEDULE.timestep(sigma.detach().double().cpu()).to(x.dtype).to(x.device)
            scale = (column**2 + 1).rsqrt()
            prediction = self.raw(x * scale, timestep_feature(timestep), labels)
            if self.parameterisation == "eps":
                return x - column * prediction
            return x * scale**2 - prediction * column * scale
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_scalings(sigma))
        return c_skip * x + c_out * self.raw(c_in * x, c_noise.reshape(-1), labels)


class ConvDenoiser(FashionDenoiser):
    """The UNets' shared ends: the timestep and class embedding, the input convolution and the zero-initialised output
    head (so a fresh network starts at the identity of its preconditioning). Called in this order from ``__init__``
    so that the parameters keep their names."""

    def add_stem(self, in_channels: int, channels: int, emb_channels: int, num_classes: int) -> None:
        self.fourier = FourierEmbedding(64)
        self.class_embed = nn.Embedding(num_classes + 1, emb_channels)
        self.emb_mlp = nn.Sequential(nn.Linear(64, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

    def add_head(self, channels: int, in_channels: int) -> None:
        self.norm_out = nn.GroupNorm(8, channels)
        self.conv_out = nn.Conv2d(channels, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embedding(self, c_noise: Tensor, labels: Tensor) -> Tensor:
        return F.silu(self.emb_mlp(self.fourier(c_noise)) + self.class_embed(labels))

    def head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))


class FashionUNet(ConvDenoiser):
    """Class-conditional UNet over three levels (28 -> 14 -> 7 on images, 14 -> 7 -> 4 on latents), attention at the
    coarsest."""

    architecture = "unet"

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 96),
        emb_channels: int = 128,
        num_classes: int = 10,
        parameterisation: str = "edm",
        in_channels: int = 1,
    ):
        super().__init__(parameterisation, num_classes)
        c0, c1, c2 = channels
        self.add_stem(in_channels, c0, emb_channels, num_classes)
        self.enc0 = ResBlock(c0, c0, emb_channels)
        self.down0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.enc1 = ResBlock(c0, c1, emb_channels)
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.enc2 = ResBlock(c1, c2, emb_channels)
        self.attn = Attention(c2)
        self.mid = ResBlock(c2, c2, emb_channels)
        self.dec2 = ResBlock(2 * c2, c2, emb_channels)
        self.dec1 = ResBlock(c2 + c1, c1, emb_channels)
        self.dec0 = ResBlock(c1 + c0, c0, emb_channels)
        self.add_head(c0, in_channels)

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        emb = self.embedding(c_noise, labels)
        h0 = self.enc0(self.conv_in(x), emb)
        h1 = self.enc1(self.down0(h0), emb)
        h2 = self.enc2(self.down1(h1), emb)
        h = self.mid(self.attn(h2), emb)
        h = self.dec2(torch.cat([h, h2], dim=1), emb)
        # Nearest upsampling to the skip's size (7 -> 14, or 4 -> 7 on latents); the decoder block's first conv does
        # the learned part of the upsampling.
        h = self.dec1(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], dim=1), emb)
        h = self.dec0(torch.cat([F.interpolate(h, size=h0.shape[-2:]), h0], dim=1), emb)
        return self.head(h)


class FashionAttentionUNet(ConvDenoiser):
    """A UNet of another layout than ``FashionUNet``: two levels on the latent (14 -> 7), wider (48 and 96 channels),
    and self-attention (4 heads) after every block at 7x7, in the encoder, the middle and the decoder, as SD-style
    UNets attend at each of their coarse levels."""

    architecture = "attention-unet"

    def __init__(
        self,
        channels: tuple[int, int] = (48, 96),
        emb_channels: int = 128,
        num_classes: int = 10,
        parameterisation: str = "flow",
        in_channels: int = LATENT_SHAPE[0],
        heads: int = 4,
    ):
        super().__init__(parameterisation, num_classes)
        c0, c1 = channels
        self.add_stem(in_channels, c0, emb_channels, num_classes)
        self.enc0 = ResBlock(c0, c0, emb_channels)
        self.down = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.enc1 = ResBlock(c0, c1, emb_channels)
        self.enc1_attn = Attention(c1, heads)
        self.mid0 = ResBlock(c1, c1, emb_channels)
        self.mid_attn = Attention(c1, heads)
        self.mid1 = ResBlock(c1, c1, emb_channels)
        self.dec1 = ResBlock(2 * c1, c1, emb_channels)
        self.dec1_attn = Attention(c1, heads)
        self.dec0 = ResBlock(c1 + c0, c0, emb_channels)
        self.add_head(c0, in_channels)

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        emb = self.embedding(c_noise, labels)
        h0 = self.enc0(self.conv_in(x), emb)
        h1 = self.enc1_attn(self.enc1(self.down(h0), emb))
        h = self.mid1(self.mid_attn(self.mid0(h1, emb)), emb)
        h = self.dec1_attn(self.dec1(torch.cat([h, h1], dim=1), emb))
        h = self.dec0(torch.cat([F.interpolate(h, size=h0.shape[-2:]), h0], dim=1), emb)
        return self.head(h)


class DiTBlock(nn.Module):
    """A DiT block (Peebles & Xie, 2023) with adaLN-Zero: the conditioning sets each sub-layer's norm scale and shift
    and gates its residual, the gates starting at zero so every block starts as the identity."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * width, width)
        )
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(emb)[:, None].chunk(6, dim=2)
        batch, tokens, width = x.shape
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + gate1 * self.proj(h)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class FashionDiT(FashionDenoiser):
    """Class-conditional DiT on the 4x14x14 latent: 2x2 patches (49 tokens), a learned position embedding,
    adaLN-Zero blocks conditioned on the timestep and class embeddings, and a modulated linear head back to patches."""

    architecture = "dit"

    def __init__(
        self,
        width: int = 144,
        depth: int = 6,
        heads: int = 4,
        patch: int = 2,
        num_classes: int = 10,
        parameterisation: str = "flow",
        in_channels: int = LATENT_SHAPE[0],
        size: int = LATENT_SHAPE[1],
    ):
        super().__init__(parameterisation, num_classes)
        self.patch = patch
        self.fourier = FourierEmbedding(64)
        self.time_mlp = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embed = nn.Embedding(num_classes + 1, width)
        self.patch_in = nn.Linear(in_channels * patch**2, width)
        self.position = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2, width))
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(width, 2 * width)
        self.patch_out = nn.Linear(width, in_channels * patch**2)
        for layer in (self.modulation_out, self.patch_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        emb = F.silu(self.time_mlp(self.fourier(c_noise)) + self.class_embed(labels))
        # [B, C, H, W] -> [B, (H/p)(W/p), C p p]: one token per patch.
        tokens = F.pixel_unshuffle(x, self.patch).flatten(2).transpose(1, 2)
        h = self.patch_in(tokens) + self.position
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.modulation_out(emb)[:, None].chunk(2, dim=2)
        patches = self.patch_out(self.norm_out(h) * (1 + scale) + shift)
        grid = patches.transpose(1, 2).reshape(batch, -1, height // self.patch, width // self.patch)
        return F.pixel_shuffle(grid, self.patch)


class FashionSmallDiT(FashionDiT):
    """The DiT at width 128 with 4 blocks (1.26 M parameters), the same code as ``FashionDiT`` at another size."""

    architecture = "small-dit"

    def __init__(self, parameterisation: str = "eps", **sizes: int):
        super().__init__(**({"width": 128, "depth": 4, "heads": 4} | sizes), parameterisation=parameterisation)


class FashionClassifier(nn.Module):
    """A small CNN on [-1, 1] images; ``features`` is its 64-d penultimate layer (for Frechet distances)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, 32),
            *block(32, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),
            *block(64, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(64, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_denoiser(architecture: str = "unet", parameterisation: str = "edm", latent: bool = False) -> FashionDenoiser:
    """A freshly initialised denoiser: a ``unet`` on images or latents; on latents only, a ``dit`` (width 144, 6
    blocks), a ``small-dit`` (width 128, 4 blocks) or an ``attention-unet``."""
    check_choice("architecture", architecture, ARCHITECTURES)
    if architecture in LATENT_ONLY and not latent:
        raise ValueError(
            f"the {architecture} works on the 4x14x14 latent only: set latent=True (train_networks --latent)"
        )
    if architecture == "dit":
        return FashionDiT(parameterisation=parameterisation)
    if architecture == "small-dit":
        return FashionSmallDiT(parameterisation=parameterisation)
    if architecture == "attention-unet":
        return FashionAttentionUNet(parameterisation=parameterisation)
    return FashionUNet(parameterisation=parameterisation, in_channels=LATENT_SHAPE[0] if latent else IMAGE_SHAPE[0])


def denoiser_description(architecture: str, parameterisation: str, latent: bool) -> dict[str, str]:
    """What a denoiser's weight file records about it (its metadata) and what loading it checks."""
    return {
        "architecture": architecture,
        "parameterisation": parameterisation,
        "space": "latent" if latent else "image",
    }


def _check_path(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: it ships with the package; retrain it with "
            "python -m consistency_solver.training.testbeds.train_networks (see README)"
        )


def _load_state(module: nn.Module, path: Path) -> nn.Module:
    state = {name: t.float() if t.is_floating_point() else t for name, t in load_file(str(path)).items()}
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


def load_denoiser(
    path: Path | str = UNET_WEIGHTS, architecture: str = "unet", parameterisation: str = "edm", latent: bool = False
) -> FashionDenoiser:
    """A shipped (EMA, fp16-stored) denoiser in float32 eval mode; refuses a file of another architecture,
    parameterisation or space."""
    path = Path(path)
    _check_path(path)
    expected = denoiser_description(architecture, parameterisation, latent)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    # Files written before these were recorded are the EDM UNet on images.
    stored = {key: metadata.get(key, old) for key, old in denoiser_description("unet", "edm", False).items()}
    if stored != expected:
        wanted = ", ".join(f"{key}={value!r}" for key, value in stored.items())
        given = ", ".join(f"{key}={value!r}" for key, value in expected.items())
        raise ValueError(f"{path} holds another denoiser; load it with {wanted}, not {given}")
    return _load_state(build_denoiser(architecture, parameterisation, latent), path)


def load_classifier(path: Path | str = CLASSIFIER_WEIGHTS) -> FashionClassifier:
    """The shipped classifier in float32 eval mode."""
    path = Path(path)
    _check_path(path)
    return _load_state(FashionClassifier(), path)


# --- test bed ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FashionModel:
    """What tells the Fashion beds apart: their model family (coefficient files match it), network, parameterisation,
    space (images, or the latent of ``encode_latent``) and shipped weights."""

    model_family: str
    parameterisation: str
    weights: Path
    architecture: str = "unet"
    latent: bool = False


FASHION_MODELS = {
    "fashion-eps-cfg": FashionModel("fashion-eps", "edm", UNET_WEIGHTS),
    "fashion-flow-cfg": FashionModel("fashion-flow", "flow", FLOW_UNET_WEIGHTS),
    # V-prediction samples in ComfyUI's EPS space (k-diffusion VE form), so its family is of the eps kind.
    "fashion-v-cfg": FashionModel("fashion-v-eps", "v", V_UNET_WEIGHTS),
    # As SD1.5: EPS on the discrete schedule, on a latent.
    "fashion-latent-eps-cfg": FashionModel("fashion-latent-eps", "eps", LATENT_EPS_UNET_WEIGHTS, latent=True),
    # As SD3 / Flux: a DiT trained as a rectified flow (CONST, shift 3) on a latent.
    "fashion-dit-flow-cfg": FashionModel("fashion-dit-flow", "flow", DIT_FLOW_WEIGHTS, architecture="dit", latent=True),
    # Beds to judge the defaults by that differ from the above in architecture: a smaller DiT as EPS on SD1.x's
    # discrete schedule (as PixArt-alpha), and a two-level UNet attending at every 7x7 block as a flow.
    "fashion-dit-eps-cfg": FashionModel(
        "fashion-dit-eps", "eps", DIT_EPS_WEIGHTS, architecture="small-dit", latent=True
    ),
    "fashion-latent-flow-cfg": FashionModel(
        "fashion-latent-flow", "flow", LATENT_FLOW_WEIGHTS, architecture="attention-unet", latent=True
    ),
}


class FashionTestBed(TestBed):
    """Fashion-MNIST, class-conditional, classifier-free guidance D_u + w (D_c - D_u), one of ``FASHION_MODELS``.

    Schedule, noise, labels and the initial state are the interface defaults of the bed's kind (Karras over SD1.5's
    range for eps and V, the shift-3 flow schedule, equal to ComfyUI's ``simple`` when the step count divides 1000,
    for flow), so one coefficient file spans these beds and the Gaussian-mixture beds of the same kind. Samples are
    in the model space (``shape``); ``decode`` turns them into images, for the classifier.
    """

    num_classes = NUM_CLASSES

    def __init__(self, name: str = "fashion-eps-cfg", guidance: float = 3.0, weights: Path | str | None = None):
        check_choice("Fashion bed", name, tuple(FASHION_MODELS))
        model = FASHION_MODELS[name]
        self.name, self.model_family, self.guidance = name, model.model_family, guidance
        self.latent = model.latent
        self.shape = LATENT_SHAPE if model.latent else IMAGE_SHAPE
        self.weights = Path(weights) if weights is not None else model.weights
        # Frozen weights instead of no_grad: the trainer's direct mode back-propagates through x.
        self.network = load_denoiser(self.weights, model.architecture, model.parameterisation, model.latent)

    def identity(self) -> str:
        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()[:16]
        return f"{super().identity()}|weights={digest}"

    def decode(self, samples: Tensor) -> Tensor:
        """Samples in the model space as [N, 1, 28, 28] images in about [-1, 1]: the latent decoded, or as they are."""
        return decode_latent(samples) if self.latent else samples

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        count = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(count)
        inputs = x.float()
        if labels is None or self.guidance == 1.0:
            return self.network(inputs, sigma, labels).to(x.dtype)
        # One batched forward for the conditional and the unconditional half, as ComfyUI batches cond/uncond.
        both = self.network(
            torch.cat([inputs, inputs]),
            torch.cat([sigma, sigma]),
            torch.cat([labels, self.network.null_labels(count)]),
        )
        conditional, unconditional = both.chunk(2)
        return (unconditional + self.guidance * (conditional - unconditional)).to(x.dtype)
