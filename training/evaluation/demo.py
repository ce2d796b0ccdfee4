"""The preview-and-refine loop on the shipped Fashion-MNIST model, in under a minute on a CPU.

    python -m consistency_solver.training.evaluation.demo [--coefficients PATH] [--classes 0 3 7 9] [--seeds 2]
        [--out FILE]

For each class and seed: a 6-step ConsistencySolver preview (the bundled default coefficient file for eps
models unless ``--coefficients`` names another), a 6-step dpmpp_2m preview, and the 40-step refined final
from the same noise (the project's reference generator). One labelled PNG grid, and the consistency of
each preview with its final (RMSE, PSNR, SSIM) printed. dpmpp_2m is the project's reimplementation, which
the tests check against ComfyUI's own function (equal to 1e-9), so the demo needs no ComfyUI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm.auto import tqdm

from ...solver import load_coefficients
from ...solver.defaults import BUNDLED_DIR, DEFAULT_FILE_COMMANDS, default_file_name
from ...solver.schedules import DiscreteSchedule
from ..testbeds import FASHION_BED, get_testbed, run_sigmas
from .evaluator import sample_previews, solver_sampler
from .metrics import psnr, rmse_per_sample, ssim
from .references import HELD_OUT_SEED_START, reference_finals, seeded_batch
from .stock_samplers import sample_dpmpp_2m

DEFAULT_COEFFICIENTS = BUNDLED_DIR / default_file_name("eps")
PREVIEW_STEPS = 6
FINAL_STEPS = 40
SCALE = 3  # 28 px -> 84 px per image
CAPTION = 14  # pixels of text under each image


def coefficient_file(path: Path | None) -> Path:
    """The coefficient file to use: ``path``, else the bundled default, which must exist (no preset fallback)."""
    chosen = path or DEFAULT_COEFFICIENTS
    if not chosen.is_file():
        if path is None:
            raise FileNotFoundError(
                f"the bundled default coefficient file {DEFAULT_COEFFICIENTS} is missing; make it with "
                f"`{DEFAULT_FILE_COMMANDS['eps']}`, or pass --coefficients PATH"
            )
        raise FileNotFoundError(f"coefficient file {chosen} does not exist; check --coefficients")
    return chosen


def to_pixels(image: Tensor) -> Image.Image:
    """A [1, 28, 28] image in [-1, 1] as a greyscale PIL image, enlarged SCALE times without smoothing."""
    grey = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(grey, mode="L").resize((28 * SCALE, 28 * SCALE), Image.NEAREST)


def grid(columns: list[str], rows: dict[str, tuple[Tensor, list[str]]]) -> Image.Image:
    """Rows of images (one per method) under column titles, each image with its caption."""
    cell, label_width, title_height = 28 * SCALE, 150, 28
    width = label_width + cell * len(columns)
    height = title_height + (cell + CAPTION) * len(rows)
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(columns):
        for line, text in enumerate(title.split("\n")):
            draw.text((label_width + j * cell + 2, 2 + 12 * line), text, fill=0)
    for i, (label, (images, captions)) in enumerate(rows.items()):
        top = title_height + i * (cell + CAPTION)
        for line, text in enumerate(label.split("\n")):
            draw.text((4, top + cell // 2 - 12 + 12 * line), text, fill=0)
        for j, (image, caption) in enumerate(zip(images, captions, strict=True)):
            canvas.paste(to_pixels(image), (label_width + j * cell, top))
            draw.text((label_width + j * cell + 2, top + cell + 1), caption, fill=0)
    return canvas


def counted(denoise: Callable[..., Tensor], progress: tqdm) -> Callable[..., Tensor]:
    def denoise_with_progress(*args, **kwargs) -> Tensor:
        denoised = denoise(*args, **kwargs)
        progress.update(1)
        return denoised

    return denoise_with_progress


def run(coefficients_path: Path | None, classes: list[int], seeds_per_class: int, out: Path) -> dict[str, float]:
    """Make the grid at ``out`` and return the mean consistency numbers of both previews."""
    coefficients = load_coefficients(coefficient_file(coefficients_path))
    bed = get_testbed(FASHION_BED)
    seeds = [HELD_OUT_SEED_START + k for k in range(seeds_per_class)] * len(classes)
    noise, _ = seeded_batch(bed, seeds)
    labels = torch.tensor([c for c in classes for _ in range(seeds_per_class)])
    sigmas = bed.sigmas(PREVIEW_STEPS).float()
    # The solver runs on its file's learned schedule when it has one (dpmpp_2m keeps the bed's).
    solver_sigmas = run_sigmas(bed, PREVIEW_STEPS, coefficients.schedule).float()
    with tqdm(total=2 * PREVIEW_STEPS + FINAL_STEPS, desc="model calls", unit="call") as progress:
        # Counting calls for the progress bar: the reference generator calls bed.denoise through bed.model.
        denoise = bed.denoise
        bed.denoise = counted(denoise, progress)
        solver = solver_sampler(coefficients, DiscreteSchedule())
        solver_previews = sample_previews(bed, solver, solver_sigmas, noise, labels)
        dpm_previews = sample_previews(bed, sample_dpmpp_2m, sigmas, noise, labels)
        finals = reference_finals(bed, noise, labels, method="multistep", steps=FINAL_STEPS)
        bed.denoise = denoise

    from ..testbeds.fashion import CLASS_NAMES

    columns = [f"{CLASS_NAMES[int(label)]}\nseed {seed}" for label, seed in zip(labels, seeds, strict=True)]
    solver_name = f"ConsistencySolver\n{PREVIEW_STEPS} steps"
    summary, rows = {}, {}
    for name, previews in ((solver_name, solver_previews), (f"dpmpp_2m\n{PREVIEW_STEPS} steps", dpm_previews)):
        rmse = rmse_per_sample(previews, finals)
        rows[name] = (previews, [f"RMSE {value:.3f}" for value in rmse.tolist()])
        key = name.split("\n")[0]
        summary[f"{key} RMSE"] = float(rmse.mean())
        summary[f"{key} PSNR"] = float(psnr(previews, finals, data_range=2.0).mean())
        summary[f"{key} SSIM"] = float(ssim(previews, finals, data_range=2.0).mean())
    rows[f"final\n{FINAL_STEPS} steps"] = (finals, [""] * len(seeds))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(columns, rows).save(out)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coefficients", type=Path, help=f"coefficient file (default: {DEFAULT_COEFFICIENTS.name})")
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 3, 7, 9], help="Fashion-MNIST classes 0-9")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per class (held-out seeds 10000, 10001, ...)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo.png"))
    args = parser.parse_args(argv)
    if any(not 0 <= c <= 9 for c in args.classes):
        parser.error(f"--classes must be in 0..9, got {args.classes}")
    torch.set_num_threads(1)  # shared cores: one thread avoids contention
    try:
        summary = run(args.coefficients, args.classes, args.seeds, args.out)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from error
    print(f"Consistency of {PREVIEW_STEPS}-step previews with their {FINAL_STEPS}-step finals (mean over images):")
    for method in ("ConsistencySolver", "dpmpp_2m"):
        print(
            f"  {method:18s} RMSE {summary[f'{method} RMSE']:.3f}   PSNR {summary[f'{method} PSNR']:.1f} dB   "
            f"SSIM {summary[f'{method} SSIM']:.3f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
