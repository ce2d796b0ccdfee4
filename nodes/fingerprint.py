"""A model's identity, in one place: its sampling (what a preview's noise and sigmas depend on) and its weights,
patches and sampling together (what a calibration is made for, and what ``auto`` matches calibrated files by).

Reads ComfyUI objects (a ModelPatcher) by their attributes only, so importing it needs no ComfyUI.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch

from .preview_state import sampling_fingerprint

_FINGERPRINT_PERCENTS = (0.25, 0.5, 0.75)
_SAMPLED_VALUES = 16  # values read from each end of every tensor: enough to tell checkpoints and LoRAs apart
# Weights per BaseModel (they never change in place but through patches, whose originals ComfyUI backs up), and the
# whole fingerprint per ModelPatcher and patch set: a model used again costs a dictionary lookup.
_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sampling_identity(model: Any, kind: str) -> str:
    """The model's sampling: its classes, sigmas at fixed percents and latent format (``kind``: eps or flow)."""
    model_sampling = model.get_model_object("model_sampling")
    latent_format = model.get_model_object("latent_format")
    points = [float(model_sampling.sigma_max), float(model_sampling.sigma_min)]
    points += [float(model_sampling.percent_to_sigma(p)) for p in _FINGERPRINT_PERCENTS]
    type_names = [base.__name__ for base in type(model_sampling).__bases__]
    return sampling_fingerprint(kind, type_names, points, type(latent_format).__name__)


def model_fingerprint(model: Any, kind: str) -> str:
    """Weights (a few values of every tensor of the diffusion model, as loaded, before any patch), patches (LoRAs:
    their keys, strengths and a few values of each tensor) and sampling, hashed; cached per ModelPatcher."""
    key = (model.patches_uuid, tuple(sorted(model.object_patches)), kind)
    cached = _models.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    digest.update(_weights_digest(model).encode())
    for name in sorted(model.patches):
        for patch in model.patches[name]:
            digest.update(f"{name}|{patch[0]}|{patch[2] if len(patch) > 2 else ''}".encode())
            _sample(digest, patch[1])
    digest.update(sampling_identity(model, kind).encode())
    fingerprint = digest.hexdigest()[:24]
    _models[model] = (key, fingerprint)
    return fingerprint


def _weights_digest(model: Any) -> str:
    base = model.model
    if base not in _weights:
        config = getattr(getattr(base, "model_config", None), "unet_config", {})
        digest = hashlib.sha256(f"{type(base).__name__}{sorted(config.items(), key=str)}".encode())
        backup = getattr(model, "backup", {})
        for name, tensor in base.diffusion_model.state_dict().items():
            saved = backup.get(f"diffusion_model.{name}")
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            _sample(digest, tensor if saved is None else saved.weight)
        _weights[base] = digest.hexdigest()
    return _weights[base]


def _sample(digest: Any, value: Any) -> None:
    """Feed a few values of every tensor in ``value`` (a tensor, list, tuple or weight adapter) to ``digest``."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().flatten()
        digest.update(torch.cat([flat[:_SAMPLED_VALUES], flat[-_SAMPLED_VALUES:]]).float().cpu().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for item in value:
            _sample(digest, item)
    elif hasattr(value, "weights"):  # ComfyUI's weight adapters (LoRA, LoHa, ...) keep their tensors there
        _sample(digest, value.weights)
    elif isinstance(value, (str, int, float, bool, type(None))):
        digest.update(repr(value).encode())
    else:  # a function or other object: its type, never its address
        digest.update(type(value).__name__.encode())


def conditioning_fingerprint(conditionings: list[Any]) -> str:
    """Every tensor and value of some conditionings (small: a prompt's embeddings), hashed whole."""
    digest = hashlib.sha256()
    _whole(digest, conditionings)
    return digest.hexdigest()[:24]


def _whole(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for item in value:
            _whole(digest, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _whole(digest, value[key])
    elif isinstance(value, (str, int, float, bool, type(None))):
        digest.update(repr(value).encode())
    else:
        digest.update(type(value).__name__.encode())
