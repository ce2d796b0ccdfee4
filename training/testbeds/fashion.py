"""Fashion-MNIST test beds: one small class-conditional UNet architecture trained in three parameterisations, and a
feature classifier, each trained once and shipped.

The UNets are trained by ``training/testbeds/train_networks.py`` and their EMA weights ship in
``training/testbeds/weights/``. Each parameterisation is a ComfyUI model type, and ``denoise`` returns x0 in its
model space, so every sampler of the pack runs on all of them unchanged:

- ``edm`` (bed ``fashion-eps-cfg``): ComfyUI EPS space, x = x0 + sigma * eps, with Karras et al. (2022)
  preconditioning inside the network.
- ``flow`` (bed ``fashion-flow-cfg``): ComfyUI CONST (rectified flow, as SD3), x = (1 - sigma) * x0 + sigma * eps,
  the network predicts the velocity eps - x0 from the timestep 1000 * sigma, and the schedule is
  ``ModelSamplingDiscreteFlow`` with shift 3.
- ``v`` (bed ``fashion-v-cfg``): ComfyUI V_PREDICTION (as SD2-768) on SD1.x's discrete 1000-step schedule: the
  network sees x / sqrt(sigma^2 + 1) and the nearest discrete timestep, and predicts v.

The classifier gives the label-agreement and Frechet metrics.
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
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "fashion_classifier.safetensors"
CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = 10
SIGMA_DATA = 0.5
PARAMETERISATIONS = ("edm", "flow", "v")
# SD1.x's discrete schedule, which ComfyUI's ModelSamplingDiscrete computes for V_PREDICTION models too.
VP_SCHEDULE = DiscreteSchedule()


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


class FashionUNet(nn.Module):
    """Class-conditional UNet on 28 -> 14 -> 7 in one of ``PARAMETERISATIONS`` (see the module docstring).

    ``forward(x, sigma, labels)`` is the denoiser D(x; sigma, label) = E[x0 | x] for x in the parameterisation's
    model space. Label ``num_classes`` is the "null" class used for classifier-free guidance (and for
    ``labels=None``). The parameterisation changes no weight shapes, only how the network is read.
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 96),
        emb_channels: int = 128,
        num_classes: int = 10,
        parameterisation: str = "edm",
    ):
        super().__init__()
        check_choice("parameterisation", parameterisation, PARAMETERISATIONS)
        self.parameterisation = parameterisation
        c0, c1, c2 = channels
        self.num_classes = num_classes
        self.fourier = FourierEmbedding(64)
        self.class_embed = nn.Embedding(num_classes + 1, emb_channels)
        self.emb_mlp = nn.Sequential(nn.Linear(64, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.conv_in = nn.Conv2d(1, c0, 3, padding=1)
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
        self.norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv2d(c0, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def null_labels(self, count: int, device: torch.device | None = None) -> Tensor:
        return torch.full((count,), self.num_classes, dtype=torch.long, device=device)

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        """The network F of the preconditioned denoiser."""
        emb = F.silu(self.emb_mlp(self.fourier(c_noise)) + self.class_embed(labels))
        h0 = self.enc0(self.conv_in(x), emb)
        h1 = self.enc1(self.down0(h0), emb)
        h2 = self.enc2(self.down1(h1), emb)
        h = self.mid(self.attn(h2), emb)
        h = self.dec2(torch.cat([h, h2], dim=1), emb)
        # Nearest upsampling; the decoder block's first conv does the learned part of the upsampling.
        h = self.dec1(torch.cat([F.interpolate(h, scale_factor=2.0), h1], dim=1), emb)
        h = self.dec0(torch.cat([F.interpolate(h, scale_factor=2.0), h0], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        if labels is None:
            labels = self.null_labels(x.shape[0], x.device)
        column = sigma.reshape(-1, 1, 1, 1)
        if self.parameterisation == "flow":
            # CONST: the input is x itself, the timestep 1000 * sigma, and denoised = x - sigma * velocity.
            return x - column * self.raw(x, timestep_feature(1000 * sigma), labels)
        if self.parameterisation == "v":
            # V_PREDICTION with sigma_data 1: input x / sqrt(sigma^2 + 1), the nearest discrete timestep (as
            # ModelSamplingDiscrete.timestep), denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1).
            timestep = VP_SCHEDULE.timestep(sigma.detach().double().cpu()).to(x.dtype).to(x.device)
            scale = (column**2 + 1).rsqrt()
            velocity = self.raw(x * scale, timestep_feature(timestep), labels)
            return x * scale**2 - velocity * column * scale
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_scalings(sigma))
        return c_skip * x + c_out * self.raw(c_in * x, c_noise.reshape(-1), labels)


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


def _load_weights(module: nn.Module, path: Path) -> nn.Module:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: it ships with the package; retrain it with "
            "python -m consistency_solver.training.testbeds.train_networks (see README)"
        )
    expected = getattr(module, "parameterisation", None)
    with safe_open(str(path), "pt") as f:
        # Files written before the parameterisation was recorded are the EDM UNet.
        stored = (f.metadata() or {}).get("parameterisation", "edm")
    if expected is not None and stored != expected:
        raise ValueError(f"{path} holds a {stored!r} UNet; load it with parameterisation={stored!r}, not {expected!r}")
    state = {name: t.float() if t.is_floating_point() else t for name, t in load_file(str(path)).items()}
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


def load_unet(path: Path | str = UNET_WEIGHTS, parameterisation: str = "edm") -> FashionUNet:
    """A shipped (EMA, fp16-stored) UNet in float32 eval mode."""
    return _load_weights(FashionUNet(parameterisation=parameterisation), Path(path))


def load_classifier(path: Path | str = CLASSIFIER_WEIGHTS) -> FashionClassifier:
    """The shipped classifier in float32 eval mode."""
    return _load_weights(FashionClassifier(), Path(path))


# --- test bed ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FashionModel:
    """What tells the Fashion beds apart: their model family (coefficient files match it), parameterisation and
    shipped weights."""

    model_family: str
    parameterisation: str
    weights: Path


FASHION_MODELS = {
    "fashion-eps-cfg": FashionModel("fashion-eps", "edm", UNET_WEIGHTS),
    "fashion-flow-cfg": FashionModel("fashion-flow", "flow", FLOW_UNET_WEIGHTS),
    # V-prediction samples in ComfyUI's EPS space (k-diffusion VE form), so its family is of the eps kind.
    "fashion-v-cfg": FashionModel("fashion-v-eps", "v", V_UNET_WEIGHTS),
}


class FashionTestBed(TestBed):
    """Fashion-MNIST, class-conditional, classifier-free guidance D_u + w (D_c - D_u), one of ``FASHION_MODELS``.

    Schedule, noise, labels and the initial state are the interface defaults of the bed's kind (Karras over SD1.5's
    range for eps and V, the shift-3 flow schedule, equal to ComfyUI's ``simple`` when the step count divides 1000,
    for flow), so one coefficient file spans these beds and the Gaussian-mixture beds of the same kind.
    """

    shape = (1, 28, 28)
    num_classes = NUM_CLASSES

    def __init__(self, name: str = "fashion-eps-cfg", guidance: float = 3.0, weights: Path | str | None = None):
        check_choice("Fashion bed", name, tuple(FASHION_MODELS))
        model = FASHION_MODELS[name]
        self.name, self.model_family, self.guidance = name, model.model_family, guidance
        self.weights = Path(weights) if weights is not None else model.weights
        # Frozen weights instead of no_grad: the trainer's direct mode back-propagates through x.
        self.unet = load_unet(self.weights, model.parameterisation).requires_grad_(False)

    def identity(self) -> str:
        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()[:16]
        return f"{super().identity()}|weights={digest}"

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        count = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(count)
        inputs = x.float()
        if labels is None or self.guidance == 1.0:
            return self.unet(inputs, sigma, labels).to(x.dtype)
        # One batched forward for the conditional and the unconditional half, as ComfyUI batches cond/uncond.
        both = self.unet(
            torch.cat([inputs, inputs]),
            torch.cat([sigma, sigma]),
            torch.cat([labels, self.unet.null_labels(count)]),
        )
        conditional, unconditional = both.chunk(2)
        return (unconditional + self.guidance * (conditional - unconditional)).to(x.dtype)
