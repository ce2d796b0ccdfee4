"""Rewards: how close a preview is to its reference final, one number per sample (higher is better).

- ``rmse``: minus the per-sample RMSE in the model's latent space (the default; differentiable).
- ``psnr``: latent PSNR for a given data range (differentiable).
- ``image-psnr`` / ``image-ssim``: PSNR or SSIM after decoding both latents with a VAE to [0, 1] images.
- ``feature``: cosine similarity of a feature model's embeddings (DINO, depth, CLIP, ...), the
  paper's kind of reward; the model is built by a user-named factory from local weights only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ...solver import UnknownChoice
from ..evaluation.metrics import psnr, rmse_per_sample, ssim

Reward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REWARD_NAMES = ("rmse", "psnr", "image-psnr", "image-ssim", "feature")


def rmse_reward(preview: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return -rmse_per_sample(preview, reference)


def decoded(reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], decode: Callable) -> Reward:
    """Score in image space: both latents go through ``decode`` (a VAE decoder to [0, 1] images) first."""

    def image_reward(preview: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return reward(decode(preview).clamp(0, 1), decode(reference).clamp(0, 1))

    return image_reward


def feature_reward(encoder: Callable[[torch.Tensor], torch.Tensor], decode: Callable | None = None) -> Reward:
    """Cosine similarity of ``encoder`` embeddings of preview and reference (after ``decode`` when given)."""

    def reward(preview: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if decode is not None:
            preview, reference = decode(preview).clamp(0, 1), decode(reference).clamp(0, 1)
        return torch.cosine_similarity(encoder(preview).flatten(1), encoder(reference).flatten(1), dim=1)

    return reward


def load_feature_encoder(factory: str, weights: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build a feature model with ``factory`` ("package.module:function") from a local weights path.

    Hub downloads are switched off first, so a factory that would fetch weights fails instead of
    reaching the network.
    """
    if "://" in os.fspath(weights) or not Path(weights).exists():
        raise FileNotFoundError(
            f"feature-reward weights {os.fspath(weights)!r} must be an existing local file or folder"
        )
    if ":" not in factory:
        raise ValueError(f"feature-reward factory {factory!r} must look like 'package.module:function'")
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    module_name, function_name = factory.split(":", 1)
    encoder = getattr(importlib.import_module(module_name), function_name)(os.fspath(weights))
    if isinstance(encoder, torch.nn.Module):
        encoder.eval().requires_grad_(False)
    return encoder


def make_reward(
    name: str,
    *,
    data_range: float = 2.0,
    decode: Callable | None = None,
    encoder: Callable | None = None,
) -> Reward:
    """The reward called ``name`` (see REWARD_NAMES); image rewards need ``decode``, ``feature`` an ``encoder``."""
    if name == "rmse":
        return rmse_reward
    if name == "psnr":
        return lambda preview, reference: psnr(preview, reference, data_range)
    if name in ("image-psnr", "image-ssim"):
        if decode is None:
            raise ValueError(
                f"use --comfy-checkpoint (its VAE decodes the latents) or the rmse/psnr reward: the {name} reward "
                "compares decoded images"
            )
        metric = ssim if name == "image-ssim" else psnr
        return decoded(lambda preview, reference: metric(preview, reference, 1.0), decode)
    if name == "feature":
        if encoder is None:
            raise ValueError("the feature reward needs an encoder: give --feature-factory and --feature-weights")
        return feature_reward(encoder, decode)
    raise UnknownChoice("reward", name, REWARD_NAMES)
