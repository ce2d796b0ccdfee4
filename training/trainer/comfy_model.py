"""The ComfyUI model the trainer trains on: a checkpoint's guided denoiser behind the test-bed interface.

The trainer needs ``model(labels)(x, sigma) -> denoised`` for any state it rolls out, with
gradients for the direct mode. ComfyUI hands out its guided denoiser only inside a sampler run, so
every call runs ComfyUI's own CFGGuider.sample with a one-evaluation sampler that evaluates the
trainer's state and returns. Conds, CFG, model patches and model loading are all ComfyUI's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...solver import check_choice
from ..evaluation.stock_samplers import import_comfy
from .data import ReferenceSettings, reference_problem
from .loop import Problem
from .rewards import make_reward


class ComfyModel:
    """A ComfyUI MODEL with a list of prompts (labels are prompt indices), shaped like a ``TestBed``.

    ``positives`` are CONDITIONINGs, one per prompt; ``negative`` is one CONDITIONING. States live on
    the model's load device (the GPU when present); noises are drawn on the CPU, as ComfyUI draws them.
    """

    def __init__(
        self,
        patcher,
        positives: list,
        negative: list,
        *,
        cfg: float,
        scheduler: str,
        width: int,
        height: int,
        name: str,
        source: str = "",
    ):
        import comfy.model_sampling
        import comfy.samplers

        self.patcher, self.positives, self.negative = patcher, positives, negative
        self.guidance, self.scheduler, self.name, self.source = cfg, scheduler, name, source
        self.num_classes = len(positives)
        check_choice("scheduler", scheduler, comfy.samplers.SCHEDULER_NAMES)
        base = patcher.model
        self.model_sampling = patcher.get_model_object("model_sampling")
        self.kind = "flow" if isinstance(self.model_sampling, comfy.model_sampling.CONST) else "eps"
        self.model_family = f"{name}-{self.kind}"
        self.shape = (base.latent_format.latent_channels, height // 8, width // 8)
        self.device = patcher.load_device
        self._guiders = {}

    def identity(self) -> str:
        prompts = repr([repr(p[0][0].flatten()[:64].tolist()) for p in self.positives])
        return f"comfy|{self.name}|{self.source}|{prompts}|cfg={self.guidance}|{self.scheduler}|{self.shape}"

    def guider(self, label: int):
        import comfy.samplers

        if label not in self._guiders:
            guider = comfy.samplers.CFGGuider(self.patcher)
            guider.set_conds(self.positives[label], self.negative)
            guider.set_cfg(self.guidance)
            self._guiders[label] = guider
        return self._guiders[label]

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """ComfyUI's guided denoised estimate for the batch, one CFGGuider run per prompt in it."""
        labels = torch.zeros(x.shape[0], dtype=torch.long) if labels is None else labels.cpu()
        sigma = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0]).cpu()
        out = torch.empty_like(x)
        for label in labels.unique().tolist():
            rows = (labels == label).nonzero().squeeze(1)
            denoised = self.guided(label, x[rows.to(x.device)], sigma[rows])
            out = out.index_copy(0, rows.to(x.device), denoised.to(x.device, x.dtype))
        return out

    def guided(self, label: int, state: Tensor, sigma: Tensor) -> Tensor:
        """One evaluation of ComfyUI's guider for prompt ``label`` at the trainer's ``state``."""
        import comfy.samplers

        result = {}
        level = sigma.to(self.device, torch.float32)

        def evaluate(model, ignored, sigmas, extra_args=None, callback=None, disable=None):
            result["denoised"] = model(state.to(self.device), level, **(extra_args or {}))
            return ignored

        zeros = torch.zeros(state.shape, dtype=torch.float32)
        # The guider's own sigmas only set up the run (noise scaling of the ignored zeros); the gradient
        # of a learned schedule flows through ``level``, where the model is evaluated.
        sigmas = torch.stack([sigma[0].detach().float(), torch.zeros(())])
        self.guider(label).sample(zeros, zeros, comfy.samplers.KSAMPLER(evaluate), sigmas, disable_pbar=True)
        return result["denoised"]

    def model(self, labels: Tensor | None) -> Callable[..., Tensor]:
        def model(x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
            return self.denoise(x, sigma, labels)

        return model

    def sigmas(self, steps: int) -> Tensor:
        import comfy.samplers

        return comfy.samplers.calculate_sigmas(self.model_sampling, self.scheduler, steps).cpu().double()

    @property
    def sigma_min(self) -> float:
        return float(self.model_sampling.sigma_min)

    @property
    def sigma_max(self) -> float:
        return float(self.model_sampling.sigma_max)

    def initial_state(self, noise: Tensor, sigmas: Tensor) -> Tensor:
        """x at sigmas[0] from an empty latent, as ComfyUI's KSAMPLER scales the noise (incl. its max-denoise rule)."""
        sigma_max = float(self.model_sampling.sigma_max)
        first = float(sigmas[0].detach())  # a learned schedule's sigmas carry gradients
        max_denoise = math.isclose(sigma_max, first, rel_tol=1e-5) or first > sigma_max
        noise = noise.to(self.device)
        sigma = sigmas[0].to(self.device, noise.dtype)
        return self.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise)

    def sample_labels(self, count: int, generator: torch.Generator) -> Tensor:
        return torch.randint(self.num_classes, (count,), generator=generator)

    def noise(self, count: int, generator: torch.Generator) -> Tensor:
        return torch.randn(count, *self.shape, generator=generator, dtype=torch.float32)

    def decode(self, vae) -> Callable[[Tensor], Tensor]:
        """Model-space latents -> [n, C, H, W] images in [0, 1] through the checkpoint's VAE."""

        def decode(latents: Tensor) -> Tensor:
            images = vae.decode(self.patcher.model.process_latent_out(latents))
            return images.reshape(-1, *images.shape[-3:]).movedim(-1, 1)

        return decode


class CheckpointNotFound(ValueError):
    """``checkpoint`` is neither a file nor a name in ComfyUI's checkpoint folders (``folders``)."""

    def __init__(self, checkpoint: str, folders: list[str]):
        self.checkpoint, self.folders = checkpoint, folders
        super().__init__(f"no checkpoint {checkpoint!r}: not a file, nor a name in {', '.join(folders)}")


def checkpoint_path(checkpoint: str, comfyui: str | None = None) -> str:
    """The file of a checkpoint given as a path or as a name in ComfyUI's models/checkpoints (imports ComfyUI from
    ``comfyui`` or $COMFYUI_PATH; raises ImportError without it, CheckpointNotFound for an unknown checkpoint)."""
    if comfyui:
        os.environ["COMFYUI_PATH"] = comfyui
    import_comfy()
    import folder_paths

    if Path(checkpoint).is_file():
        return checkpoint
    path = folder_paths.get_full_path("checkpoints", checkpoint)
    if path is None:
        raise CheckpointNotFound(checkpoint, folder_paths.get_folder_paths("checkpoints"))
    return path


def load_comfy_checkpoint(checkpoint: str, comfyui: str | None = None):
    """(model patcher, clip, vae) from a checkpoint path or a name in ComfyUI's models/checkpoints."""
    path = checkpoint_path(checkpoint, comfyui)
    import comfy.sd
    import folder_paths

    patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )
    if clip is None:
        raise ValueError(f"checkpoint {path!r} has no text encoder; the trainer needs one to encode --prompts")
    return patcher, clip, vae


def encode_prompt(clip, text: str) -> list:
    """CONDITIONING for ``text``, as ComfyUI's CLIPTextEncode node makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@dataclass(frozen=True)
class CheckpointRequest:
    """A ComfyUI checkpoint to train for, and how the trainer samples it."""

    checkpoint: str  # a path, or a name in ComfyUI's models/checkpoints
    prompt_text: str  # one prompt per line; blank lines are skipped
    negative: str
    cfg: float
    scheduler: str
    width: int
    height: int
    reward: str
    comfyui: str | None = None  # the ComfyUI install; None: $COMFYUI_PATH or /opt/ComfyUI


class NoPrompts(ValueError):
    """The prompt text holds no prompt (every line is blank)."""


def comfy_model(request: CheckpointRequest) -> tuple[ComfyModel, Any]:
    """The checkpoint's guided model on the request's prompts (a label is a prompt index), and its VAE."""
    prompts = [line.strip() for line in request.prompt_text.splitlines() if line.strip()]
    if not prompts:
        raise NoPrompts("the prompt text has no prompts")
    patcher, clip, vae = load_comfy_checkpoint(request.checkpoint, request.comfyui)
    with torch.no_grad():
        positives = [encode_prompt(clip, text) for text in prompts]
        negative = encode_prompt(clip, request.negative)
    model = ComfyModel(
        patcher,
        positives,
        negative,
        cfg=request.cfg,
        scheduler=request.scheduler,
        width=request.width,
        height=request.height,
        name=Path(request.checkpoint).stem,
        source=request.prompt_text,
    )
    return model, vae


def comfy_problem(request: CheckpointRequest, settings: ReferenceSettings) -> Problem:
    """The trainer's Problem for a real checkpoint: its guided model on the prompts, with reference sets."""
    model, vae = comfy_model(request)
    decode = model.decode(vae) if request.reward.startswith("image-") else None
    return reference_problem(model, make_reward(request.reward, decode=decode), settings)
