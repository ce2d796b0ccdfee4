"""The calibration benchmark, the artist's case: calibrate as the Calibrate node does, on one prompt, and judge it.

    python -m consistency_solver.training.evaluation.calibration_benchmark [--beds NAME ...] [--classes 0 3 7]
        [--budget 3000] [--no-prompts-comparison] [--out DIR]

Per learned bed and class: the refine is the node's default (ComfyUI's dpmpp_2m, ``simple``, 30 steps, the bed's
guidance); the calibration runs the runtime's calibrator with its guard as the node drives it (probe, candidates,
noise plan, record, fit, validate) within the node's default budget of model calls, on the class as its prompt. The
file is judged on 64 fresh noises of that class ("same prompt") and 64 fresh noises of the classes no calibration of
the run saw ("other prompts"; with the default classes 0, 3 and 7: the other seven), against every stock ComfyUI
sampler on the family's schedulers and the bundled default on its learned schedule: RMSE to the refine of the same
noise. Then, per bed, three prompts against one: a calibration on all the classes (the noises spread over them, as
the node does with three prompts) and the one-prompt file of the first class, both judged on those other prompts.
Tables to stdout and ``OUT/calibration.md``, numbers to ``OUT/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
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
DEFAULT, ONE_PROMPT = "default", "one prompt"


class Judge:
    """Judges coefficient files on a bed's fresh noises, computing the stock samplers' rows of a noise set once."""

    def __init__(self, bed):
        self.bed, self.refine = bed, default_refine(bed)
        self.default = load_coefficients(BUNDLED_DIR / default_file_name(bed.kind))
        self.noise, self.drawn = seeded_batch(bed, held_out_seeds(2 * JUDGE_NOISES))
        self.stock: dict[tuple, dict] = {}

    def labels(self, classes: list[int], offset: int) -> torch.Tensor:
        """JUDGE_NOISES labels spread over ``classes``, following the drawn labels (from ``offset``)."""
        drawn = self.drawn[offset : offset + JUDGE_NOISES]
        return torch.tensor([classes[int(c) % len(classes)] for c in drawn])

    def rows(self, sources: dict, classes: list[int], offset: int) -> dict[str, dict[int, float]]:
        noise, labels = self.noise[offset : offset + JUDGE_NOISES], self.labels(classes, offset)
        key = (tuple(labels.tolist()), offset)
        if key not in self.stock:
            self.stock[key] = judge(self.bed, self.refine, {DEFAULT: self.default}, noise, labels, STEPS)
        return {**self.stock[key], **judge(self.bed, self.refine, sources, noise, labels, STEPS, stock=False)}


def cells(rows: dict[str, dict[int, float]], label: str) -> dict[str, dict]:
    result = {}
    for n in STEPS:
        vs_stock, best = ratio_to_best_stock(rows, label, n)
        stock = rows[label][n] / vs_stock
        result[str(n)] = {
            "rmse": rows[label][n],
            DEFAULT: rows[DEFAULT][n],
            "best_stock": best,
            "best_stock_rmse": stock,
            "vs_stock": vs_stock,
            "vs_guard": rows[label][n] / min(stock, rows[DEFAULT][n]),
        }
    return result


def calibrated_cells(judge_: Judge, label: int, unseen: list[int], budget: int) -> tuple[dict, object]:
    """Calibrate on one class and judge on it and on the ``unseen`` classes."""
    bed = judge_.bed
    started = time.perf_counter()
    calibration = calibrate_bed(bed, STEPS, budget, classes=[label], refine=judge_.refine)
    seconds = time.perf_counter() - started
    result = {"bed": bed.name, "class": label, "seconds": seconds, "refine": judge_.refine.label,
              **calibration.summary()}  # fmt: skip
    for prompt, classes, offset in (("same", [label], 0), ("other", unseen, JUDGE_NOISES)):
        result[prompt] = cells(judge_.rows({CALIBRATED: calibration.coefficients}, classes, offset), CALIBRATED)
    return result, calibration


def prompts_cells(judge_: Judge, seen: list[int], unseen: list[int], one_prompt, budget: int) -> dict:
    """Several prompts (``seen``) against the first alone, on the classes neither calibration saw."""
    bed = judge_.bed
    calibration = calibrate_bed(bed, STEPS, budget, classes=seen, refine=judge_.refine)
    sources = {CALIBRATED: calibration.coefficients, ONE_PROMPT: one_prompt.coefficients}
    rows = judge_.rows(sources, unseen, JUDGE_NOISES)
    return {"bed": bed.name, "prompts": seen, "three": cells(rows, CALIBRATED), "one": cells(rows, ONE_PROMPT),
            "winners": calibration.summary()["winners"]}  # fmt: skip


def table(results: list[dict]) -> str:
    lines = [
        "| bed | class | steps | the file uses | same prompt: RMSE (x best stock, x min(stock, default)) | "
        "other prompts | default: same / other (x best stock) | model calls | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for n in map(str, STEPS):
            same, other = r["same"][n], r["other"][n]
            default = " / ".join(f"{p[DEFAULT] / p['best_stock_rmse']:.2f}x" for p in (same, other))
            lines.append(
                f"| {r['bed']} | {r['class']} | {n} | {r['winners'][n]} | "
                f"{same['rmse']:.4f} ({same['vs_stock']:.2f}x, {same['vs_guard']:.2f}x) | "
                f"{other['rmse']:.4f} ({other['vs_stock']:.2f}x, {other['vs_guard']:.2f}x) | {default} | "
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


def prompts_table(results: list[dict]) -> str:
    lines = [
        "| bed | calibrated on | steps | all the prompts: RMSE (x best stock) | the first prompt alone: RMSE "
        "(x best stock) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for n in map(str, STEPS):
            three, one = r["three"][n], r["one"][n]
            lines.append(
                f"| {r['bed']} | {','.join(map(str, r['prompts']))} | {n} | {three['rmse']:.4f} "
                f"({three['vs_stock']:.2f}x) | {one['rmse']:.4f} ({one['vs_stock']:.2f}x) |"
            )
    for n in map(str, STEPS):
        three = sum(r["three"][n]["vs_stock"] for r in results) / len(results)
        one = sum(r["one"][n]["vs_stock"] for r in results) / len(results)
        lines.append(f"\n- {n} steps, on classes neither saw: all the prompts {three:.3f}x, the first alone {one:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beds", nargs="+", default=list(FASHION_BEDS), choices=FASHION_BEDS)
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASSES))
    parser.add_argument("--budget", type=int, default=BUDGET)
    parser.add_argument("--no-prompts-comparison", action="store_true", help="skip three prompts against one")
    parser.add_argument("--out", type=Path, default=Path("outputs/calibration"))
    args = parser.parse_args(argv)
    if comfy_unavailable_reason() is not None:
        parser.error(f"the artist's case compares with ComfyUI's samplers: {comfy_unavailable_reason()}")
    torch.set_num_threads(1)
    results, comparisons = [], []
    for name in args.beds:
        judge_ = Judge(get_testbed(name))
        unseen = [c for c in range(judge_.bed.num_classes) if c not in args.classes]
        for label in args.classes:
            result, calibration = calibrated_cells(judge_, label, unseen, args.budget)
            results.append(result)
            print(json.dumps({k: result[k] for k in ("bed", "class", "winners", "same", "other")}), flush=True)
            if label == args.classes[0]:
                first = calibration
        if not args.no_prompts_comparison:
            comparisons.append(prompts_cells(judge_, list(args.classes), unseen, first, args.budget))
            print(json.dumps(comparisons[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps({"cells": results, "prompts": comparisons}, indent=1))
    header = (
        f"Made by `python -m consistency_solver.training.evaluation.calibration_benchmark` on {date.today()}, "
        f"{platform.processor() or platform.machine()}, one thread, torch {torch.__version__}; budget "
        f"{args.budget} model calls, refine {results[0]['refine']}."
    )
    text = "\n\n".join([header, table(results), *([prompts_table(comparisons)] if comparisons else [])])
    (args.out / "calibration.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
