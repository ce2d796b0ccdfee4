"""The results summary of README.md: one table and one plot, from the numbers the benchmarks wrote.

    python -m consistency_solver.training.evaluation.summary BENCHMARK_JSON [...] [--calibration CALIBRATION_JSON]
        [--plot docs/images/results.png]

``BENCHMARK_JSON`` is the ``results.json`` of ``benchmark`` (its defaults table: each bundled default on the bed's
stock schedule and on its learned one, against every stock ComfyUI sampler), or several, runs of different beds (a
bed in two is read from the last); ``CALIBRATION_JSON`` the
``calibration.json`` of ``calibration_benchmark`` (the artist's case: a file calibrated on one prompt, judged on
fresh noises of that prompt). For every bed of the benchmark, at 5 and 8 steps, the table shows the RMSE of a
preview to the 40-step final from the same noise for what users run today (dpmpp_2m on karras for EPS/V models,
euler on simple for flow), for the best stock sampler on that stock schedule and for the default file on its learned
schedule (the ``consistency_solver`` scheduler), each as a multiple of the best stock sampler's; and, where the
calibration benchmark ran the bed, the calibrated file's multiple of the best stock sampler against its own target
(the refine it was calibrated to), averaged over the classes it was calibrated on, one at a time. Printed as
markdown; the plot shows the multiples.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from .benchmark import LEARNED_SCHEDULE, STOCK_SCHEDULE, USERS_SAMPLER

STEPS = (5, 8)


@dataclass(frozen=True)
class Cell:
    """One bed at one step count: each way to preview, against the best stock sampler."""

    users: float  # RMSE of USERS_SAMPLER on the stock schedule
    users_name: str  # e.g. "dpmpp_2m on karras"
    best_stock: float  # RMSE of the best stock sampler on the stock schedule
    best_stock_name: str
    default: float  # RMSE of the bundled default on its learned schedule
    calibrated: float | None  # the calibrated file's RMSE / the best stock sampler's (its own target); None: not run


def calibrated_ratios(calibration: dict | None) -> dict[str, dict[int, float]]:
    """{bed: {steps: mean over its one-prompt calibrations of calibrated RMSE / best stock RMSE, same prompt}}."""
    ratios: dict[str, dict[int, list[float]]] = {}
    for result in (calibration or {}).get("cells", []):
        for n, cell in result["same"].items():
            ratios.setdefault(result["bed"], {}).setdefault(int(n), []).append(cell["vs_stock"])
    return {bed: {n: statistics.fmean(values) for n, values in cells.items()} for bed, cells in ratios.items()}


def cells(benchmark: dict, calibration: dict | None, steps: tuple[int, ...] = STEPS) -> dict[str, dict[int, Cell]]:
    """{bed: {steps: Cell}} for every bed of ``benchmark`` with a judged default at ``steps``."""
    calibrated = calibrated_ratios(calibration)
    table = {}
    for bed, result in benchmark.items():
        for judged in result.get("defaults", {}).values():
            stock = next(schedule for schedule in judged if schedule != LEARNED_SCHEDULE)
            kind = next(kind for kind, schedule in STOCK_SCHEDULE.items() if schedule == stock)
            bed_cells = {}
            for n in steps:
                on_stock, learned = judged[stock].get(str(n)), judged[LEARNED_SCHEDULE].get(str(n))
                if on_stock is None or learned is None or on_stock["users_rmse"] is None:
                    continue
                bed_cells[n] = Cell(
                    on_stock["users_rmse"],
                    f"{USERS_SAMPLER[kind]} on {stock}",
                    on_stock["best_stock_rmse"],
                    on_stock["best_stock"],
                    learned["rmse"],
                    calibrated.get(bed, {}).get(n),
                )
            if bed_cells:
                table[bed] = bed_cells
    return table


def calibrated_any(table: dict[str, dict[int, Cell]]) -> bool:
    return any(cell.calibrated is not None for bed_cells in table.values() for cell in bed_cells.values())


def markdown(table: dict[str, dict[int, Cell]]) -> str:
    """The table; its calibrated column only where a calibration benchmark was given."""
    calibrated = calibrated_any(table)
    header = "| bed | steps | users' sampler today | best stock sampler | default file, learned schedule |"
    lines = [header + (" calibrated file |" if calibrated else ""), "|---" * (5 + calibrated) + "|"]
    for bed, bed_cells in table.items():
        for n, cell in bed_cells.items():
            row = (
                f"| {bed} | {n} | {cell.users:.3f} ({cell.users_name}, {cell.users / cell.best_stock:.2f}x) | "
                f"{cell.best_stock:.3f} ({cell.best_stock_name}) | {cell.default:.3f} "
                f"({cell.default / cell.best_stock:.2f}x) |"
            )
            if calibrated:
                row += " — |" if cell.calibrated is None else f" {cell.calibrated:.2f}x |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[int, Cell]], path: Path) -> None:
    """One panel per step count: for each bed, each way to preview as a multiple of the best stock sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({n for bed_cells in table.values() for n in bed_cells})
    series = (
        ("users' sampler today", lambda cell: cell.users / cell.best_stock, "tab:gray"),
        ("default file, learned schedule", lambda cell: cell.default / cell.best_stock, "tab:orange"),
        ("calibrated file (its own refine)", lambda cell: cell.calibrated, "tab:green"),
    )[: 3 if calibrated_any(table) else 2]
    figure, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 4.2), squeeze=False, sharey=True)
    width = 0.8 / len(series)
    beds = list(table)
    for axis, n in zip(axes[0], steps, strict=True):
        for i, (label, value, color) in enumerate(series):
            xs, heights = [], []
            for x, bed in enumerate(beds):
                ratio = value(table[bed][n]) if n in table[bed] else None
                if ratio is not None:
                    xs.append(x + (i - (len(series) - 1) / 2) * width)
                    heights.append(ratio)
            axis.bar(xs, heights, width, label=label, color=color)
        axis.axhline(1.0, color="tab:blue", linewidth=1.2, label="best stock sampler")
        axis.set_xticks(range(len(beds)), [bed.removeprefix("fashion-") for bed in beds], rotation=20, fontsize=8)
        axis.set(title=f"{n}-step previews", ylabel="RMSE to the final, x the best stock sampler's")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels, clear of every bar
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", type=Path, nargs="+", help="results.json of the benchmark (one or more runs)")
    parser.add_argument("--calibration", type=Path, help="calibration.json of the calibration benchmark")
    parser.add_argument("--plot", type=Path, help="where to write the plot (PNG)")
    args = parser.parse_args(argv)
    benchmark = {bed: result for path in args.benchmark for bed, result in json.loads(path.read_text()).items()}
    calibration = json.loads(args.calibration.read_text()) if args.calibration else None
    table = cells(benchmark, calibration)
    if not table:
        shown = " ".join(map(str, args.benchmark))
        parser.error(f"argument benchmark: {shown} judges no default at {STEPS} steps; run the benchmark")
    print(markdown(table), end="")
    if args.plot:
        plot(table, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
