"""PREVIEW_STATE: what DiffusionPreview hands to DiffusionRefine so the refine starts from the same noise.

Pure torch. The state is immutable in practice: ComfyUI caches node outputs and may feed one state
to several Refine nodes, so every function here returns new objects and never edits its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .coefficients import CoefficientSelection

SELECT_ALL = "all"
DEFAULT_REFINE_SAMPLER = "dpmpp_2m"  # a strong stock multistep sampler; Refine's SAMPLER input overrides it


@dataclass(frozen=True)
class PreviewRequest:
    """Diffusion Preview's settings for one run (besides model, conditioning and latent)."""

    seed: int
    steps: int
    cfg: float
    scheduler: str
    denoise: float
    selection: CoefficientSelection


@dataclass(frozen=True)
class RefineRequest:
    """Diffusion Refine's settings for one run; ``sampler`` None is DEFAULT_REFINE_SAMPLER."""

    select: str
    steps: int
    cfg: float
    scheduler: str
    sampler: Any = None


@dataclass(frozen=True)
class PreviewState:
    """One preview run. ``noise`` is the exact CPU noise the preview used (ComfyUI's prepare_noise of
    ``latent["samples"]`` after the empty-latent channel fix), one slice per batch element;
    ``latent`` is the source latent dict (samples, and batch_index / noise_mask when present)."""

    seed: int
    noise: torch.Tensor
    latent: dict[str, Any]
    steps: int
    scheduler: str
    cfg: float
    denoise: float
    sigmas: torch.Tensor
    model_fingerprint: str
    coefficients: str

    @property
    def batch_size(self) -> int:
        return self.noise.shape[0]


def parse_selection(select: str, batch_size: int) -> list[int]:
    """``all`` or comma-separated batch positions such as ``0,2`` (negative positions count from the end)."""
    text = select.strip().lower()
    if text == SELECT_ALL:
        return list(range(batch_size))
    try:
        positions = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"Type 'all' or positions such as '0,2' in Diffusion Refine's select: {select!r} is neither."
        ) from None
    if not positions:
        raise ValueError(
            "Type 'all' or the previews to refine, such as '0,2', in Diffusion Refine's select: it is empty."
        )
    bad = [p for p in positions if not -batch_size <= p < batch_size]
    if bad:
        raise ValueError(
            f"Pick previews 0 to {batch_size - 1} (or 'all') in Diffusion Refine's select: {select!r} names {bad}, "
            f"and the preview batch has {batch_size}."
        )
    return [p % batch_size for p in positions]


def select_previews(state: PreviewState, positions: list[int]) -> PreviewState:
    """The state restricted to some batch positions: their noise slices, latents, masks and batch indices."""
    if positions == list(range(state.batch_size)):
        return state
    index = torch.tensor(positions, dtype=torch.long)
    latent = dict(state.latent)
    latent["samples"] = _rows(state.latent["samples"], positions)
    if "batch_index" in latent:
        latent["batch_index"] = [latent["batch_index"][p] for p in positions]
    if "noise_mask" in latent:
        latent["noise_mask"] = _rows(batch_mask(latent["noise_mask"], latent["samples"].ndim), positions)
    return replace(state, noise=state.noise.index_select(0, index), latent=latent)


def _rows(tensor: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Rows for batch positions, with ComfyUI's rule that a shorter batch repeats (comfy.utils.repeat_to_batch_size)."""
    rows = torch.tensor([p % tensor.shape[0] for p in positions], dtype=torch.long)
    return tensor.index_select(0, rows.to(tensor.device))


def batch_mask(mask: torch.Tensor, latent_ndim: int) -> torch.Tensor:
    """The mask with its batch in dim 0, as ComfyUI's ``comfy.utils.reshape_mask`` lays it out before repeating it
    over the batch: for image latents any mask becomes [batch, 1, H, W] (an [H, W] mask is a batch of one); for
    video latents a mask of fewer than 5 dims is one mask for the whole batch."""
    if latent_ndim == 4:
        return mask.reshape(-1, 1, *mask.shape[-2:])
    if latent_ndim == 5 and mask.ndim < 5:
        return mask.reshape(1, 1, -1, *mask.shape[-2:])
    return mask


def check_state_fits(state: PreviewState, model_fingerprint: str, latent_channels: int) -> None:
    """Refuse a state made by another model sampling (its noise scale and sigmas differ) or latent shape."""
    if state.model_fingerprint != model_fingerprint:
        raise ValueError(
            "Connect the same model (with the same sampling patches) to Diffusion Preview and Diffusion Refine: "
            f"the preview was made with a different model sampling ({state.model_fingerprint}) than the refine's "
            f"model ({model_fingerprint})."
        )
    channels = state.latent["samples"].shape[1]
    if channels != latent_channels:
        raise ValueError(
            f"Refine with the model that made the preview: its latent has {channels} channels, and the model "
            f"connected to Diffusion Refine expects {latent_channels}."
        )


def sampling_fingerprint(kind: str, type_names: list[str], sigma_points: list[float], latent_format: str) -> str:
    """A short, printable identity of a model's sampling: its classes, sigmas at fixed percents and latent format."""
    points = ",".join(f"{value:.6g}" for value in sigma_points)
    return f"{kind}:{'+'.join(type_names)}:[{points}]:{latent_format}"
