"""PREVIEW_STATE: what DiffusionPreview hands to DiffusionRefine so the refine starts from the same noise.

Pure torch. The state is immutable in practice: ComfyUI caches node outputs and may feed one state
to several Refine nodes, so every function here returns new objects and never edits its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

SELECT_ALL = "all"
DEFAULT_REFINE_SAMPLER = "dpmpp_2m"  # a strong stock multistep sampler; Refine's SAMPLER input overrides it


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
        raise ValueError(f"select {select!r} is not 'all' or a list like '0,2'. Fix: type 'all' or indices") from None
    if not positions:
        raise ValueError("select is empty. Fix: type 'all' or the previews to refine, e.g. '0,2'")
    bad = [p for p in positions if not -batch_size <= p < batch_size]
    if bad:
        raise ValueError(
            f"select {select!r} names previews {bad}, but the preview batch has {batch_size} "
            f"(positions 0 to {batch_size - 1}). Fix: pick positions inside the batch or 'all'"
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
        latent["noise_mask"] = _rows(latent["noise_mask"], positions)
    return replace(state, noise=state.noise.index_select(0, index), latent=latent)


def _rows(tensor: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Rows for batch positions, with ComfyUI's rule that a shorter batch repeats (comfy.utils.repeat_to_batch_size)."""
    rows = torch.tensor([p % tensor.shape[0] for p in positions], dtype=torch.long)
    return tensor.index_select(0, rows.to(tensor.device))


def check_state_fits(state: PreviewState, model_fingerprint: str, latent_channels: int) -> None:
    """Refuse a state made by another model sampling (its noise scale and sigmas differ) or latent shape."""
    if state.model_fingerprint != model_fingerprint:
        raise ValueError(
            "this preview state was made with a different model sampling "
            f"({state.model_fingerprint}) than the model given to DiffusionRefine ({model_fingerprint}). "
            "Fix: connect the same model (with the same sampling patches) to DiffusionPreview and DiffusionRefine"
        )
    channels = state.latent["samples"].shape[1]
    if channels != latent_channels:
        raise ValueError(
            f"this preview state holds a latent with {channels} channels, but the refine model expects "
            f"{latent_channels}. Fix: refine with the model that made the preview"
        )


def sampling_fingerprint(kind: str, type_names: list[str], sigma_points: list[float], latent_format: str) -> str:
    """A short, printable identity of a model's sampling: its classes, sigmas at fixed percents and latent format."""
    points = ",".join(f"{value:.6g}" for value in sigma_points)
    return f"{kind}:{'+'.join(type_names)}:[{points}]:{latent_format}"
