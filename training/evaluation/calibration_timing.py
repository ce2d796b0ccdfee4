"""What a calibration spends besides model calls: the fitting and the race, on one CPU thread.

    python -m consistency_solver.training.evaluation.calibration_timing [--beds NAME ...] [--budget 3000]

Calibrates each bed as the Calibrate node does with its defaults (5 and 8 steps, the refine dpmpp_2m on ``simple``
for 30 steps) on one garment class, timing every call into the bed's network; prints a table of the whole
calibration's seconds, those inside model calls and the rest. Needs ComfyUI (``COMFYUI_PATH``) for the refine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ..testbeds import FASHION_BEDS, get_testbed
from .calibrated import calibrate_bed

STEPS = (5, 8)
GARMENT = 7


def timed(function: Callable, spent: list[float]) -> Callable:
    def call(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        spent[0] += time.perf_counter() - started
        return result

    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beds", nargs="+", default=list(FASHION_BEDS), choices=FASHION_BEDS)
    parser.add_argument("--budget", type=int, default=3000, help="model calls, as the node's budget")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| bed | model calls | seconds in all | in model calls | besides model calls |")
    print("|---|---|---|---|---|")
    for name in args.beds:
        bed, spent = get_testbed(name), [0.0]
        bed.denoise = timed(bed.denoise, spent)
        started = time.perf_counter()
        calibration = calibrate_bed(bed, STEPS, args.budget, classes=[GARMENT])
        total = time.perf_counter() - started
        print(f"| {name} | {calibration.model_calls} | {total:.1f} | {spent[0]:.1f} | {total - spent[0]:.1f} |")


if __name__ == "__main__":
    main()
