"""The README's calibration picture: previews next to their finals, stock, default and calibrated, at 5 and 8 steps.

    python -m consistency_solver.training.evaluation.calibration_picture [--bed fashion-eps-cfg] [--garment 7]
        [--out docs/images/calibration.png]

Calibrates as the Calibrate node does with its defaults (the refine: ComfyUI's dpmpp_2m, ``simple``, 30 steps; a
budget of 3,000 model calls) on one garment class of a Fashion-MNIST bed, then shows four fresh noises of that
class: per step count, the best stock sampler (the lowest RMSE on 16 fresh noises among every stock sampler on the
family's schedulers), the bundled default on its learned schedule and the calibrated file, each with its RMSE to the
final, and the final (the refine) below. Needs ComfyUI (``COMFYUI_PATH``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ...calibration import Calibration
from ...solver import load_coefficients
from ...solver.defaults import BUNDLED_DIR, default_file_name
from ..testbeds import FASHION_BEDS, get_testbed, run_sigmas
from .calibrated import CALIBRATED, STOCK_PREFIX, calibrate_bed, default_refine, judge, ksampler_sigmas
from .demo import grid
from .evaluator import sample_previews, solver_sampler
from .metrics import rmse_per_sample
from .references import held_out_seeds, seeded_batch
from .stock_samplers import stock_sampler

STEPS = (5, 8)
SHOWN = 4  # noises in the picture
JUDGED = 16  # noises that pick the best stock sampler
DEFAULT = "default"


def kept(calibration: Calibration, steps: int) -> str:
    """What the guard kept at ``steps`` when the fit lost, as a caption line."""
    winner = calibration.validation.winners[steps]
    return "" if calibration.kinds[winner] == CALIBRATED else f"\nkept {winner}"


def picture(bed_name: str, garment: int, out: Path) -> dict[str, float]:
    from ..testbeds.fashion import CLASS_NAMES

    bed = get_testbed(bed_name)
    refine = default_refine(bed)
    calibration = calibrate_bed(bed, STEPS, 3000, classes=[garment], refine=refine)
    default = load_coefficients(BUNDLED_DIR / default_file_name(bed.kind))
    sources = {CALIBRATED: calibration.coefficients, DEFAULT: default}
    noise, _ = seeded_batch(bed, held_out_seeds(JUDGED))
    labels = torch.full((JUDGED,), garment)
    rows = judge(bed, refine, sources, noise, labels, STEPS)
    finals = sample_previews(bed, refine.sampler, refine.sigmas.float(), noise[:SHOWN], labels[:SHOWN])
    shown, summary = {}, {}
    for n in STEPS:
        best = min((row for row in rows if row.startswith(STOCK_PREFIX)), key=lambda row: rows[row][n])
        name, scheduler = best.removeprefix(STOCK_PREFIX).split(" / ")
        runs = {
            f"{name} ({scheduler})\n{n} steps, best stock": (
                stock_sampler(name), ksampler_sigmas(bed, name, scheduler, n).float()
            ),
            f"default\n{n} steps": (solver_sampler(default), run_sigmas(bed, n, default.schedule).float()),
            f"calibrated\n{n} steps{kept(calibration, n)}": (
                solver_sampler(calibration.coefficients), run_sigmas(bed, n, calibration.coefficients.schedule).float()
            ),
        }  # fmt: skip
        for label, (sampler, sigmas) in runs.items():
            previews = sample_previews(bed, sampler, sigmas, noise[:SHOWN], labels[:SHOWN])
            errors = rmse_per_sample(bed.decode(previews), bed.decode(finals))
            shown[label] = (bed.decode(previews), [f"RMSE {value:.3f}" for value in errors.tolist()])
        summary |= {f"{n} {key}": rows[row][n] for key, row in (("best stock", best), (DEFAULT, DEFAULT),
                                                                 (CALIBRATED, CALIBRATED))}  # fmt: skip
    shown[f"final\n{refine.label}"] = (bed.decode(finals), [""] * SHOWN)
    columns = [f"{CLASS_NAMES[garment]}\nfresh noise {k + 1}" for k in range(SHOWN)]
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(columns, shown).save(out)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bed", default="fashion-eps-cfg", choices=FASHION_BEDS)
    parser.add_argument("--garment", type=int, default=7, help="the Fashion-MNIST class calibrated on, 0-9")
    parser.add_argument("--out", type=Path, default=Path("docs/images/calibration.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    summary = picture(args.bed, args.garment, args.out)
    print("RMSE to the refine on 16 fresh noises of the class:")
    for key, value in summary.items():
        print(f"  {key}: {value:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
