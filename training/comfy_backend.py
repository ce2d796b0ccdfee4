"""ComfyUI's own code, imported in-process for benchmarks and tests (never vendored).

Stock-sampler part: ``import_comfy`` makes ``comfy`` importable on a CPU-only machine and
``stock_sampler`` returns ComfyUI's sampler functions, which take the same ``model(x, sigma)`` callable
as this project's samplers. None of the eight samplers used here looks up
``model.inner_model.model_patcher`` or ``model_sampling`` (checked in ComfyUI 0.3.64's
``comfy/k_diffusion/sampling.py`` and ``comfy/extra_samplers/uni_pc.py``), so a test bed's
``model(labels)`` is passed to them directly, with no wrapper objects.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

STOCK_SAMPLERS = ("euler", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2", "res_multistep")


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"))


def import_comfy() -> ModuleType:
    """Return ``comfy.k_diffusion.sampling``, importing ComfyUI from ``COMFYUI_PATH`` (default /opt/ComfyUI).

    Without CUDA, ``comfy.cli_args.args.cpu`` is set before anything imports ``comfy.model_management``,
    which otherwise fails at import on CPU-only torch. Raises ImportError naming the fix when ComfyUI is absent.
    """
    if "comfy.k_diffusion.sampling" in sys.modules:
        return sys.modules["comfy.k_diffusion.sampling"]
    root = comfyui_path()
    if "comfy" not in sys.modules:
        if not (root / "comfy" / "k_diffusion" / "sampling.py").is_file():
            raise ImportError(f"ComfyUI not found at {root}: set COMFYUI_PATH to a ComfyUI checkout (0.3.64 or later)")
        # Appended, not prepended: ComfyUI's top-level names (tests, utils, app) must not shadow ours.
        if str(root) not in sys.path:
            sys.path.append(str(root))
    if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
        from comfy.cli_args import args

        args.cpu = True
    import comfy.k_diffusion.sampling

    return comfy.k_diffusion.sampling


@cache
def comfy_unavailable_reason() -> str | None:
    """None when ComfyUI's samplers import, else why not (for "absent" rows and test skips)."""
    try:
        import_comfy()
        import comfy.samplers  # noqa: F401  (stock_sampler_sigmas reads KSampler's settings)
    except Exception as error:  # any import-time failure means the same thing: no ComfyUI rows
        return f"ComfyUI not importable: {error}"
    return None


def stock_sampler(name: str) -> Callable[..., Tensor]:
    """ComfyUI's sampler function ``name`` (one of ``STOCK_SAMPLERS``), with the k-diffusion sampler contract."""
    if name not in STOCK_SAMPLERS:
        raise ValueError(f"unknown stock sampler {name!r}; available: {', '.join(STOCK_SAMPLERS)}")
    sampling = import_comfy()
    if name in ("uni_pc", "uni_pc_bh2"):
        from comfy.extra_samplers import uni_pc

        function = uni_pc.sample_unipc if name == "uni_pc" else uni_pc.sample_unipc_bh2
    else:
        function = getattr(sampling, f"sample_{name}")

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        # ComfyUI's KSAMPLER always passes a dict; sample_unipc fails on None.
        return function(model, x, sigmas, {} if extra_args is None else extra_args, callback, disable)

    return sampler


def stock_sampler_sigmas(name: str, schedule: Callable[[int], Tensor], steps: int) -> Tensor:
    """The sigmas ComfyUI's KSampler gives sampler ``name`` for ``steps`` steps of ``schedule``.

    KSampler computes ``steps + 1`` steps and drops the penultimate sigma for the samplers in
    ``KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS`` (uni_pc, uni_pc_bh2, dpm_2...), so they still take
    ``steps`` model calls but end from a lower last sigma. UniPC then stops at sigma = 0.001 instead of 0
    (inside ``sample_unipc``); both are what a ComfyUI user gets and are kept.
    """
    import_comfy()
    import comfy.samplers

    if name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = schedule(steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return schedule(steps)


# --- Trainer part: a ComfyUI model behind the test-bed interface ------------------------------------
#
# The trainer needs ``model(labels)(x, sigma) -> denoised`` for any state it rolls out, with
# gradients for the direct mode. ComfyUI hands out its guided denoiser only inside a sampler run, so
# every call runs ComfyUI's own CFGGuider.sample with a one-evaluation sampler that evaluates the
# trainer's state and returns. Conds, CFG, model patches and model loading are all ComfyUI's.


class ComfyModel:
    """A ComfyUI MODEL with a list of prompts (labels are prompt indices), shaped like a ``TestBed``.

    ``positives`` are CONDITIONINGs, one per prompt; ``negative`` is one CONDITIONING. States live on
    the model's load device (the GPU when present); noises are drawn on the CPU, as ComfyUI draws them.
    """

    guidance_note = "ComfyUI CFGGuider"

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
        if scheduler not in comfy.samplers.SCHEDULER_HANDLERS:
            raise ValueError(
                f"unknown scheduler {scheduler!r}; ComfyUI has {', '.join(comfy.samplers.SCHEDULER_NAMES)}"
            )
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


def load_comfy_checkpoint(checkpoint: str, comfyui: str | None = None):
    """(model patcher, clip, vae) from a checkpoint path or a name in ComfyUI's models/checkpoints."""
    if comfyui:
        os.environ["COMFYUI_PATH"] = comfyui
    import_comfy()
    import comfy.sd
    import folder_paths

    path = checkpoint if Path(checkpoint).is_file() else folder_paths.get_full_path_or_raise("checkpoints", checkpoint)
    patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )
    if clip is None:
        raise ValueError(f"checkpoint {path!r} has no text encoder; the trainer needs one to encode --prompts")
    return patcher, clip, vae


def encode_prompt(clip, text: str) -> list:
    """CONDITIONING for ``text``, as ComfyUI's CLIPTextEncode node makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def comfy_problem(args, settings):
    """The trainer's Problem for a real checkpoint (``python -m consistency_solver.training --comfy-checkpoint``)."""
    from .references import held_out_seeds, training_seeds
    from .train.data import reference_set
    from .train.loop import Problem
    from .train.rewards import make_reward

    if not args.prompts:
        raise SystemExit("--comfy-checkpoint needs --prompts (a text file with one prompt per line)")
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"{args.prompts} has no prompts")
    patcher, clip, vae = load_comfy_checkpoint(args.comfy_checkpoint, args.comfyui)
    with torch.no_grad():
        positives = [encode_prompt(clip, text) for text in prompts]
        negative = encode_prompt(clip, args.negative)
    name = Path(args.comfy_checkpoint).stem
    model = ComfyModel(
        patcher,
        positives,
        negative,
        cfg=args.cfg,
        scheduler=args.scheduler,
        width=args.width,
        height=args.height,
        name=name,
        source=Path(args.prompts).read_text(),
    )
    decode = model.decode(vae) if args.reward.startswith("image-") else None
    reward = make_reward(args.reward, decode=decode)
    return Problem(
        bed=model,
        train=reference_set(model, training_seeds(settings.train_count), settings),
        held_out=reference_set(model, held_out_seeds(settings.held_out_count), settings),
        reward=reward,
    )
