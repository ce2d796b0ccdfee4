"""The results summary of README.md: one table and one plot, from the numbers the benchmarks wrote.

    python -m consistency_solver.training.evaluation.summary BENCHMARK_JSON [--calibration CALIBRATION_JSON]
        [--plot docs/images/results.png]

``BENCHMARK_JSON`` is the ``results.json`` of ``benchmark`` (its defaults table: each bundled default on the bed's
stock schedule and on its learned one, against every stock ComfyUI sampler), ``CALIBRATION_JSON`` the
``calibration.json`` of ``calibration_benchmark``. For every bed and step count in both, the table shows what users
run today (dpmpp_2m on karras for EPS/V models, euler on simple for flow), the best stock sampler on that stock
schedule, the default file on its learned schedule (the ``consistency_solver`` scheduler) and, where the
calibration benchmark ran the bed, the file the calibrator fitted to it; RMSE to the 40-step final from the same
noise, lower is better, and each ratio to the users' sampler. It is printed as markdown; the plot shows the same
numbers.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .benchmark import LEARNED_SCHEDULE, STOCK_SCHEDULE, USERS_SAMPLER

STEPS = (5, 8)


@dataclass(frozen=True)
class Cell:
    """One bed at one step count: RMSE to the final of each way to preview."""

    users: float  # USERS_SAMPLER on the stock schedule
    users_name: str  # e.g. "dpmpp_2m on karras"
    best_stock: float  # the best stock sampler on the stock schedule
    best_stock_name: str
    default: float  # the bundled default on its learned schedule
    calibrated: float | None  # the calibrator's file, where the calibration benchmark ran the bed


def cells(benchmark: dict, calibration: dict | None, steps: tuple[int, ...] = STEPS) -> dict[str, dict[int, Cell]]:
    """{bed: {steps: Cell}} for every bed of ``benchmark`` with a judged default at ``steps``."""
    calibrated = {row["bed"]: row["cells"] for row in (calibration or {}).get("results", [])}
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
                fitted = calibrated.get(bed, {}).get(str(n))
                bed_cells[n] = Cell(
                    on_stock["users_rmse"],
                    f"{USERS_SAMPLER[kind]} on {stock}",
                    on_stock["best_stock_rmse"],
                    on_stock["best_stock"],
                    learned["rmse"],
                    None if fitted is None else fitted["calibrated"],
                )
            if bed_cells:
                table[bed] = bed_cells
    return table


def shown(rmse: float | None, users: float, name: str = "") -> str:
    """An RMSE with its ratio to the users' sampler (and the sampler's name, if given); a dash where none."""
    return "—" if rmse is None else f"{rmse:.3f} ({name}{rmse / users:.2f}x)"


def markdown(table: dict[str, dict[int, Cell]]) -> str:
    lines = [
        "| bed | steps | users' sampler today | best stock sampler | default file, learned schedule | "
        "calibrated file |",
        "|---|---|---|---|---|---|",
    ]
    for bed, bed_cells in table.items():
        for n, cell in bed_cells.items():
            lines.append(
                f"| {bed} | {n} | {cell.users:.3f} ({cell.users_name}) | "
                f"{shown(cell.best_stock, cell.users, cell.best_stock_name + ', ')} | "
                f"{shown(cell.default, cell.users)} | {shown(cell.calibrated, cell.users)} |"
            )
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[int, Cell]], path: Path) -> None:
    """One panel per step count: for each bed, the RMSE of each way to preview, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({n for bed_cells in table.values() for n in bed_cells})
    series = (
        ("users' sampler today", "users", "tab:gray"),
        ("best stock sampler", "best_stock", "tab:blue"),
        ("default file, learned schedule", "default", "tab:orange"),
        ("calibrated file", "calibrated", "tab:green"),
    )
    figure, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 3.8), squeeze=False, sharey=True)
    width = 0.8 / len(series)
    beds = list(table)
    for axis, n in zip(axes[0], steps, strict=True):
        for i, (label, field, color) in enumerate(series):
            xs, heights = [], []
            for x, bed in enumerate(beds):
                value = getattr(table[bed][n], field) if n in table[bed] else None
                if value is not None:
                    xs.append(x + (i - (len(series) - 1) / 2) * width)
                    heights.append(value)
            axis.bar(xs, heights, width, label=label, color=color)
        axis.set_xticks(range(len(beds)), [bed.removeprefix("fashion-") for bed in beds], rotation=20, fontsize=8)
        axis.set(title=f"{n}-step previews", ylabel="RMSE to the 40-step final (lower is better)")
    axes[0][-1].legend(fontsize=8, loc="upper left")  # the longer step count's bars are lower: room at the top
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", type=Path, help="results.json of the benchmark")
    parser.add_argument("--calibration", type=Path, help="calibration.json of the calibration benchmark")
    parser.add_argument("--plot", type=Path, help="where to write the plot (PNG)")
    args = parser.parse_args(argv)
    benchmark = json.loads(args.benchmark.read_text())
    calibration = json.loads(args.calibration.read_text()) if args.calibration else None
    table = cells(benchmark, calibration)
    if not table:
        parser.error(f"argument benchmark: {args.benchmark} judges no default at {STEPS} steps; run the benchmark")
    print(markdown(table), end="")
    if args.plot:
        plot(table, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
