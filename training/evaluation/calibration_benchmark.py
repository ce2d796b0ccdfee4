"""Calibration benchmark: the forward-only calibrator on every bed, against the stock samplers and the trained files.

    python -m consistency_solver.training.evaluation.calibration_benchmark [--beds NAME ...] [--budget 3000]
        [--budgets 500 1000 2000 4000 8000] [--plot-beds NAME ...] [--out DIR] [--quick]

For each bed: calibrate 5 and 8 steps together within ``--budget`` model calls (the 40-step reference runs of the
calibration noises included), then compare on held-out noises (GMM beds 2048, Fashion 64, as the benchmark)
with the bed's own trained file and the default file (each on its learned schedule) and every stock ComfyUI
sampler (the project's dpmpp_2m when ComfyUI is absent). The acceptance of issue 10 is checked per cell:
calibrated <= 0.8x (5 steps) / 1.0x (8 steps) the best stock sampler, and <= 1.25x the own file, or <= 1.1x the
own file where the own file itself misses the stock ratio. Then the budget curve: held-out RMSE against the
budget at 5 and 8 steps on ``--plot-beds``. Tables go to stdout and ``OUT/calibration.md``, numbers to
``OUT/calibration.json``, the plot to ``OUT/calibration_budget.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ...solver import load_coefficients, model_kind
from ...solver.defaults import BUNDLED_DIR, default_file_name
from ..testbeds import COEFFICIENTS_DIR, FASHION_BED, FASHION_BEDS, TESTBED_NAMES, get_testbed
from .calibrated import (
    CALIBRATED,
    calibrate_bed,
    calibration_noises,
    held_out_comparison,
    stock_rows,
)

STEPS = (5, 8)
STOCK_RATIO = {5: 0.8, 8: 1.0}
OWN_RATIO, OWN_MISSED_RATIO = 1.25, 1.1
BUDGET = 3000
BUDGETS = (500, 1000, 2000, 4000, 8000)
PLOT_BEDS = (FASHION_BED, "gmm-vector-eps-cfg", "gmm-image-flow-cfg")
HELD_OUT = {"gmm": 2048, "fashion": 64}
OWN, DEFAULT = "own trained file", "default file"


def held_out_count(name: str) -> int:
    return HELD_OUT["fashion" if name in FASHION_BEDS else "gmm"]


def bed_row(name: str, budget: int) -> dict:
    """Calibrate one bed and compare it on held-out noises; every number of its table row."""
    torch.manual_seed(0)
    bed = get_testbed(name)
    noises = calibration_noises(budget, STEPS)
    started = time.perf_counter()
    calibration = calibrate_bed(bed, STEPS, budget, noises)
    seconds = time.perf_counter() - started
    sources = {
        CALIBRATED: calibration.coefficients,
        OWN: load_coefficients(COEFFICIENTS_DIR / f"{name}.safetensors"),
        DEFAULT: load_coefficients(BUNDLED_DIR / default_file_name(model_kind(bed.model_family))),
    }
    rows = held_out_comparison(bed, sources, STEPS, held_out_count(name))
    cells = {}
    for n in STEPS:
        best = min(stock_rows(rows), key=lambda row: rows[row][n])
        stock = rows[best][n]
        own, calibrated = rows[OWN][n], rows[CALIBRATED][n]
        own_misses = own > STOCK_RATIO[n] * stock
        limit = OWN_MISSED_RATIO * own if own_misses else min(STOCK_RATIO[n] * stock, OWN_RATIO * own)
        cells[n] = {
            "calibrated": calibrated,
            "own": own,
            "default": rows[DEFAULT][n],
            "best_stock": best,
            "best_stock_rmse": stock,
            "vs_stock": calibrated / stock,
            "vs_own": calibrated / own,
            "limit": limit,
            "passes": calibrated <= limit,
        }
    return {
        "bed": name,
        "model_calls": calibration.model_calls,
        "seconds": seconds,
        "noises": noises,
        "held_out": held_out_count(name),
        "cells": cells,
        "rows": rows,
    }


def budget_curve(name: str, budgets: tuple[int, ...]) -> dict[int, dict]:
    """Held-out RMSE at every budget (5 and 8 steps), with the calls and seconds each calibration took."""
    bed = get_testbed(name)
    curve = {}
    for budget in budgets:
        noises = calibration_noises(budget, STEPS)
        started = time.perf_counter()
        calibration = calibrate_bed(bed, STEPS, budget, noises)
        seconds = time.perf_counter() - started
        rows = held_out_comparison(bed, {CALIBRATED: calibration.coefficients}, STEPS, held_out_count(name))
        curve[budget] = {"rmse": rows[CALIBRATED], "model_calls": calibration.model_calls, "seconds": seconds}
    return curve


def table(results: list[dict]) -> str:
    lines = [
        "| bed | steps | calibrated | own file | default file | best stock | vs stock | vs own | limit | "
        "pass | model calls | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for n, cell in result["cells"].items():
            lines.append(
                f"| {result['bed']} | {n} | {cell['calibrated']:.3f} | {cell['own']:.3f} | {cell['default']:.3f} | "
                f"{cell['best_stock_rmse']:.3f} ({cell['best_stock'].removeprefix('ComfyUI ')}) | "
                f"{cell['vs_stock']:.2f}x | {cell['vs_own']:.2f}x | {cell['limit']:.3f} | "
                f"{'yes' if cell['passes'] else 'MISS'} | {result['model_calls']} | {result['seconds']:.0f} |"
            )
    return "\n".join(lines)


def plot(path: Path, curves: dict[str, dict[int, dict]], results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    stock = {r["bed"]: r["cells"] for r in results}
    for axis, (name, curve) in zip(axes[0], curves.items(), strict=True):
        budgets = sorted(curve)
        for n, color in zip(STEPS, ("tab:blue", "tab:orange"), strict=True):
            axis.plot(budgets, [curve[b]["rmse"][n] for b in budgets], "o-", color=color, label=f"calibrated, {n}")
            if name in stock:
                cell = stock[name][n]
                axis.axhline(cell["best_stock_rmse"], color=color, ls=":", label=f"best stock, {n}")
                axis.axhline(cell["own"], color=color, ls="--", label=f"own trained file, {n}")
        axis.set(xscale="log", yscale="log", xlabel="model calls (budget)", ylabel="held-out RMSE", title=name)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Each bed is judged against its own trained file, so only beds that have one can be chosen.
    trained_beds = [name for name in TESTBED_NAMES if (COEFFICIENTS_DIR / f"{name}.safetensors").is_file()]
    parser.add_argument("--beds", nargs="+", choices=trained_beds, default=trained_beds)
    parser.add_argument("--budget", type=int, default=BUDGET)
    parser.add_argument("--budgets", type=int, nargs="*", default=list(BUDGETS))
    parser.add_argument("--plot-beds", nargs="*", choices=TESTBED_NAMES, default=list(PLOT_BEDS))
    parser.add_argument("--out", type=Path, default=Path("outputs") / "calibration")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.beds:
        results.append(bed_row(name, args.budget))
        print("\n".join(table(results[-1:]).splitlines()[2:]), flush=True)
    curves = {name: budget_curve(name, tuple(args.budgets)) for name in args.plot_beds if args.budgets}
    text = f"Calibration at {args.budget} model calls, 5 and 8 steps together\n\n{table(results)}\n"
    if curves:
        text += "\nBudget curve (held-out RMSE at 5 / 8 steps, model calls, seconds):\n\n"
        text += "| bed | " + " | ".join(str(b) for b in args.budgets) + " |\n"
        text += "|---|" + "---|" * len(args.budgets) + "\n"
        for name, curve in curves.items():
            text += (
                f"| {name} | "
                + " | ".join(
                    f"{curve[b]['rmse'][5]:.3f} / {curve[b]['rmse'][8]:.3f} ({curve[b]['model_calls']}, "
                    f"{curve[b]['seconds']:.0f} s)"
                    for b in args.budgets
                )
                + " |\n"
            )
        plot(args.out / "calibration_budget.png", curves, results)
    print(text)
    (args.out / "calibration.md").write_text(text)
    (args.out / "calibration.json").write_text(
        json.dumps({"results": results, "curves": curves}, indent=2, sort_keys=True, default=str)
    )


if __name__ == "__main__":
    main()
