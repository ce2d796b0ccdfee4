"""The calibration benchmark, the artist's case: calibrate as the Calibrate node does, on one prompt, and judge it.

    python -m consistency_solver.training.evaluation.calibration_benchmark [--beds NAME ...] [--classes 0 3 7]
        [--budget 3000] [--prompts 1 3] [--out DIR]

Per learned bed and class: the refine is the node's default (ComfyUI's dpmpp_2m, ``simple``, 30 steps, the bed's
guidance); the calibration runs the runtime's calibrator with its guard as the node drives it (probe, candidates,
noise plan, record, fit, validate) within the node's default budget of model calls, on the class as its prompt
(with ``--prompts 3``: on that class and the next two, the noises spread over them, as the node does with three
prompts). The file is judged on 64 fresh noises of that class and 64 of the other classes (for three prompts: of
the seven classes it never saw), against every stock ComfyUI sampler on the family's schedulers and the bundled
default on its learned schedule: RMSE to the refine of the same noise. Tables to stdout and ``OUT/calibration.md``,
numbers to ``OUT/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ...solver import load_coefficients
from ...solver.defaults import BUNDLED_DIR, default_file_name
from ..testbeds import FASHION_BEDS, get_testbed
from .calibrated import CALIBRATED, calibrate_bed, default_refine, judge, ratio_to_best_stock
from .references import held_out_seeds, seeded_batch
from .stock_samplers import comfy_unavailable_reason

STEPS = (5, 8)
BUDGET = 3000
JUDGE_NOISES = 64
CLASSES = (0, 3, 7)
DEFAULT = "default"


def prompt_classes(label: int, prompts: int, classes: int) -> list[int]:
    return [(label + k) % classes for k in range(prompts)]


def bed_cells(name: str, label: int, prompts: int, budget: int) -> dict:
    """Calibrate on ``prompts`` classes from ``label`` and judge on the calibrated classes and on the others."""
    bed = get_testbed(name)
    refine = default_refine(bed)
    seen = prompt_classes(label, prompts, bed.num_classes)
    started = time.perf_counter()
    calibration = calibrate_bed(bed, STEPS, budget, classes=seen, refine=refine)
    seconds = time.perf_counter() - started
    default = load_coefficients(BUNDLED_DIR / default_file_name(bed.kind))
    sources = {CALIBRATED: calibration.coefficients, DEFAULT: default}
    noise, drawn = seeded_batch(bed, held_out_seeds(2 * JUDGE_NOISES))
    same = torch.tensor([seen[j % len(seen)] for j in range(JUDGE_NOISES)])
    unseen = [c for c in range(bed.num_classes) if c not in seen]
    others = torch.tensor([unseen[int(c) % len(unseen)] for c in drawn[JUDGE_NOISES:]])
    result = {"bed": name, "class": label, "prompts": seen, "seconds": seconds, "refine": refine.label,
              **calibration.summary()}  # fmt: skip
    for prompt, labels, part in (("same", same, noise[:JUDGE_NOISES]), ("other", others, noise[JUDGE_NOISES:])):
        rows = judge(bed, refine, sources, part, labels, STEPS)
        result[prompt] = {}
        for n in STEPS:
            vs_stock, best = ratio_to_best_stock(rows, CALIBRATED, n)
            guard = min(rows[CALIBRATED][n] / vs_stock, rows[DEFAULT][n])
            result[prompt][str(n)] = {
                CALIBRATED: rows[CALIBRATED][n],
                DEFAULT: rows[DEFAULT][n],
                "best_stock": best,
                "best_stock_rmse": rows[CALIBRATED][n] / vs_stock,
                "vs_stock": vs_stock,
                "vs_guard": rows[CALIBRATED][n] / guard,
            }
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| bed | prompts | steps | the file uses | same prompt: RMSE (x best stock, x min(stock, default)) | "
        "other prompts | default: same / other (x best stock) | model calls | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for n in map(str, STEPS):
            same, other = r["same"][n], r["other"][n]
            default = "/".join(f"{p[DEFAULT] / p['best_stock_rmse']:.2f}x" for p in (same, other))
            lines.append(
                f"| {r['bed']} | {','.join(map(str, r['prompts']))} | {n} | {r['winners'][n]} | "
                f"{same[CALIBRATED]:.4f} ({same['vs_stock']:.2f}x, {same['vs_guard']:.2f}x) | "
                f"{other[CALIBRATED]:.4f} ({other['vs_stock']:.2f}x, {other['vs_guard']:.2f}x) | {default} | "
                f"{r['model_calls']} | {r['seconds']:.0f} |"
            )
    lines.append("")
    for n in map(str, STEPS):
        for prompt in ("same", "other"):
            ratios = [r[prompt][n]["vs_stock"] for r in results]
            worst = max(results, key=lambda r: r[prompt][n]["vs_guard"])
            lines.append(
                f"- {n} steps, {prompt} prompt: mean {sum(ratios) / len(ratios):.3f}x the best stock sampler; worst "
                f"cell {worst[prompt][n]['vs_guard']:.3f}x min(best stock, default) ({worst['bed']}, class "
                f"{worst['class']})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beds", nargs="+", default=list(FASHION_BEDS), choices=FASHION_BEDS)
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASSES))
    parser.add_argument("--budget", type=int, default=BUDGET)
    parser.add_argument("--prompts", nargs="+", type=int, default=[1], help="prompts per calibration (1 and/or 3)")
    parser.add_argument("--out", type=Path, default=Path("outputs/calibration"))
    args = parser.parse_args(argv)
    if comfy_unavailable_reason() is not None:
        parser.error(f"the artist's case compares with ComfyUI's samplers: {comfy_unavailable_reason()}")
    torch.set_num_threads(1)
    results = []
    for prompts in args.prompts:
        for name in args.beds:
            for label in args.classes:
                results.append(bed_cells(name, label, prompts, args.budget))
                print(json.dumps({k: results[-1][k] for k in ("bed", "prompts", "winners", "same", "other")}),
                      flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join(table([r for r in results if len(r["prompts"]) == p]) for p in args.prompts)
    (args.out / "calibration.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
