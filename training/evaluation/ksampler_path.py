"""Learned test beds run through ComfyUI's KSampler path, with ``consistency_solver`` picked by name.

    python -m consistency_solver.training.evaluation.ksampler_path [--beds NAME ...] [--steps 5 8] [--samples 64]
        [--eps-file PATH] [--flow-file PATH]

Most users meet the pack by picking ``consistency_solver`` in KSampler's sampler list, on a stock scheduler or on
the ``consistency_solver`` scheduler (the default file's learned schedule). ComfyUI then resolves the pack's default
file for the model's family, computes the sigmas, applies CFG to the conditional and unconditional predictions and
calls the sampler through its own model wrapper. To measure that path, ``bed_model`` makes a bed's network a ComfyUI
model: a ``BaseModel`` of type EPS (``ModelSamplingDiscrete``, SD1.x's schedule) for the eps kind or FLOW
(``ModelSamplingDiscreteFlow``, shift 3, as SD3) for flow, with an identity latent format, whose diffusion model
undoes ComfyUI's input scaling, calls the bed's unguided network with the label the conditioning carries (the null
class in the negative) and returns the noise (EPS) or velocity (FLOW) that gives the network's denoised estimate.
Then ``comfy.sample.sample``, what the KSampler node calls once it has drawn its noise, runs on the benchmark's
held-out noises with ComfyUI's CFG at the bed's guidance.

ComfyUI starts an EPS model at sqrt(1 + sigma_max^2) * noise (the variance-preserving scaling) where the beds start
at sigma_max * noise, so the noise handed to KSampler is scaled by sigma_max / sqrt(1 + sigma_max^2): both paths then
start from the same state, and the table sets KSampler's RMSE to the benchmark's 40-step references beside the
solver API's (the benchmark's rows, ``solver.sample_consistency_solver`` on the same sigmas), with the largest
difference between their samples. ComfyUI's ``simple`` schedule is the beds' flow schedule only when the step count
divides 1000; at other counts the table says how far the sigmas differ.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...solver import load_coefficients
from ...solver.defaults import BUNDLED_DIR, default_file_name
from ..testbeds import FASHION_BEDS, TestBed, get_testbed, run_sigmas
from .benchmark import LEARNED_SCHEDULE, REFERENCE_STEPS, STOCK_SCHEDULE, bed_samples
from .evaluator import sample_previews, solver_sampler
from .metrics import consistency_rmse
from .references import held_out_seeds, reference_cache_dir, reference_finals, seeded_batch
from .stock_samplers import import_comfy

SAMPLER_NAME = "consistency_solver"


class BedNetwork(torch.nn.Module):
    """A bed's unguided network as a ComfyUI diffusion model (``BaseModel`` builds it from the config's
    ``unet_config``): x from ComfyUI's scaled input, the label from the conditioning, the model type's output."""

    def __init__(self, bed: TestBed, **_config: Any):
        super().__init__()
        self.kind = bed.kind
        self.network = bed.network
        self.dtype = torch.float32

    def forward(self, xc: Tensor, t: Tensor, context: Tensor | None = None, transformer_options=None, **_: Any):
        # ComfyUI batches cond and uncond copies; "sigmas" holds one copy's (every row has the step's sigma).
        sigma = transformer_options["sigmas"].to(xc.dtype)
        sigma = sigma.repeat(xc.shape[0] // sigma.shape[0])
        column = sigma.view(-1, *([1] * (xc.dim() - 1)))
        x = xc if self.kind == "flow" else xc * (column**2 + 1).sqrt()  # EPS: calculate_input is x / sqrt(s^2 + 1)
        denoised = self.network(x, sigma, context[:, 0, 0].round().long())
        return (x - denoised) / column  # EPS noise, or CONST velocity: both give denoised = x - sigma * output


def bed_model(bed: TestBed):
    """The bed as a ComfyUI MODEL (a ModelPatcher on the CPU)."""
    import_comfy()
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base

    class LatentFormat(comfy.latent_formats.LatentFormat):
        latent_channels = bed.shape[0]

    class Config(comfy.supported_models_base.BASE):
        unet_extra_config = {}
        latent_format = LatentFormat
        sampling_settings = {"shift": 3.0, "multiplier": 1000} if bed.kind == "flow" else {}

    config = Config({"bed": bed})
    config.set_inference_dtype(torch.float32, None)
    model_type = comfy.model_base.ModelType.FLOW if bed.kind == "flow" else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(config, model_type, device=torch.device("cpu"), unet_model=BedNetwork)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def conditioning(labels: Tensor) -> list:
    """A CONDITIONING that carries one label per sample (a [batch, 1, 1] cross-attention tensor)."""
    return [[labels.float().view(-1, 1, 1), {}]]


def ksampler_run(
    model, bed: TestBed, noise: Tensor, labels: Tensor, steps: int, scheduler: str
) -> tuple[Tensor, Tensor]:
    """(samples, sigmas) of KSampler's ``consistency_solver`` on ``scheduler`` from the bed's start of ``noise``."""
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=SAMPLER_NAME, scheduler=scheduler)
    sigmas = sampler.sigmas.double()
    model_sampling = model.get_model_object("model_sampling")
    sigma_max, sigma_start = float(model_sampling.sigma_max), float(sigmas[0])
    # KSAMPLER.max_denoise: at sigma_max ComfyUI scales an EPS model's noise by sqrt(1 + sigma^2), not sigma.
    max_denoise = math.isclose(sigma_max, sigma_start, rel_tol=1e-5) or sigma_start > sigma_max
    scale = sigma_start / math.sqrt(1 + sigma_start**2) if bed.kind == "eps" and max_denoise else 1.0
    negative = torch.full_like(labels, bed.num_classes)
    samples = comfy.sample.sample(
        model, noise * scale, steps, bed.guidance, SAMPLER_NAME, scheduler, conditioning(labels),
        conditioning(negative), torch.zeros_like(noise), disable_pbar=True, seed=0,
    )  # fmt: skip
    return model.model.process_latent_in(samples), sigmas


def measure(beds: list[str], files: dict[str, Path], steps: tuple[int, ...], samples: int | None, log) -> list[dict]:
    """KSampler by name against the solver API, per bed, step count and schedule."""
    import_comfy()
    from ...nodes import coefficients, register

    register()
    rows = []
    for kind, path in files.items():
        with tempfile.TemporaryDirectory() as folder:
            # The pack's default file for this family is ``path``, as the node tests swap it.
            shutil.copyfile(path, Path(folder) / default_file_name(kind))
            original, coefficients.BUNDLED_DIR = coefficients.BUNDLED_DIR, Path(folder)
            try:
                rows += measure_kind(kind, beds, path, steps, samples, log)
            finally:
                coefficients.BUNDLED_DIR = original
    return rows


def measure_kind(kind: str, beds: list[str], path: Path, steps: tuple[int, ...], samples: int | None, log):
    file = load_coefficients(path)
    rows = []
    for name in beds:
        bed = get_testbed(name)
        if bed.kind != kind:
            continue
        count = samples or bed_samples(name, quick=False)
        noise, labels = seeded_batch(bed, held_out_seeds(count))
        references = reference_finals(bed, noise, labels, steps=REFERENCE_STEPS, cache_dir=reference_cache_dir())
        model = bed_model(bed)
        for n in steps:
            for scheduler in (STOCK_SCHEDULE[kind], LEARNED_SCHEDULE):
                log(f"{name}: {n} steps, {scheduler}")
                through_comfy, comfy_sigmas = ksampler_run(model, bed, noise, labels, n, scheduler)
                sigmas = (bed.sigmas(n) if scheduler != LEARNED_SCHEDULE else run_sigmas(bed, n, file.schedule)).float()
                direct = sample_previews(bed, solver_sampler(file), sigmas, noise, labels)
                rows.append(
                    {"bed": name, "file": path.name, "steps": n, "scheduler": scheduler,
                     "ksampler_rmse": consistency_rmse(through_comfy, references),
                     "solver_rmse": consistency_rmse(direct, references),
                     "max_sample_difference": float((through_comfy - direct).abs().max()),
                     "max_sigma_difference": float((comfy_sigmas - sigmas.double()).abs().max())}
                )  # fmt: skip
    return rows


def table(rows: list[dict], command: str) -> str:
    lines = [
        "### KSampler by name against the solver API",
        "",
        f"`{command}`",
        "",
        "| bed | default file | steps | scheduler | RMSE through KSampler | RMSE, solver API | largest sample "
        "difference | largest sigma difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['bed']} | {row['file']} | {row['steps']} | {row['scheduler']} | {row['ksampler_rmse']:.4f} | "
            f"{row['solver_rmse']:.4f} | {row['max_sample_difference']:.1e} | {row['max_sigma_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beds", nargs="+", choices=FASHION_BEDS, default=list(FASHION_BEDS))
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 8])
    parser.add_argument("--samples", type=int, help="held-out noises per bed (default: the benchmark's)")
    for kind in ("eps", "flow"):
        parser.add_argument(
            f"--{kind}-file", type=Path, default=BUNDLED_DIR / default_file_name(kind),
            help=f"the file KSampler gets as the pack's default for {kind} models (default: the bundled one)",
        )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    arguments = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m consistency_solver.training.evaluation.ksampler_path", *arguments])

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = measure(args.beds, {"eps": args.eps_file, "flow": args.flow_file}, tuple(args.steps), args.samples, log)
    print(table(rows, command), flush=True)


if __name__ == "__main__":
    main()
