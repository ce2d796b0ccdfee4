"""The training report: a JSON file with every number and a PNG with the reward curve and the
held-out consistency per step count against the presets, dpmpp_2m, every stock ComfyUI sampler (when ComfyUI
imports) and the initial policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...solver import PRESET_NAMES, Preset
from ..evaluation.stock_samplers import dpmpp_2m, is_stock_label, stock_comparison
from .loop import Problem, TrainConfig, TrainState, build_policy, coefficients, held_out_rmse, held_out_sampler_rmse


def held_out_table(
    state: TrainState, problems: list[Problem], names: list[str], config: TrainConfig, steps: list[int]
) -> dict[str, dict[str, dict[int, float]]]:
    """{problem name: {solver: {steps: held-out RMSE}}} for the trained and initial policy, presets and the stock
    samplers (``stock_comparison``: every stock ComfyUI sampler, as KSampler gives it its sigmas, when ComfyUI
    imports): the fair comparison is with the best of them, not only with dpmpp_2m."""
    sources = {
        "trained": coefficients(state.policy, config, state.schedule),
        "initial policy": coefficients(build_policy(config), config),
        **{name: Preset(name) for name in PRESET_NAMES},
    }
    table = {}
    for name, problem in zip(names, problems, strict=True):
        rows = {label: {n: held_out_rmse(source, problem, n) for n in steps} for label, source in sources.items()}
        for label, (sampler, schedule) in stock_comparison(problem.bed.sigmas).items():
            rows[label] = {n: held_out_sampler_rmse(sampler, problem, schedule(n).float()) for n in steps}
        table[name] = rows
    return table


def ratios(rows: dict[str, dict[int, float]]) -> dict[int, dict[str, float]]:
    """Trained RMSE over the best preset's, over dpmpp_2m's and over the best stock sampler's, per step count
    (acceptance: <= 0.8)."""
    _, dpmpp_2m_label = dpmpp_2m()
    stock = [label for label in rows if is_stock_label(label)]
    result = {}
    for n, trained in rows["trained"].items():
        best = min(rows[name][n] for name in PRESET_NAMES)
        result[n] = {
            "vs_best_preset": trained / best,
            "vs_dpmpp_2m": trained / rows[dpmpp_2m_label][n],
            "vs_best_stock": trained / min(rows[label][n] for label in stock),
        }
    return result


def write_report(
    directory: str | os.PathLike,
    state: TrainState,
    problems: list[Problem],
    names: list[str],
    config: TrainConfig,
    extra: dict[str, Any],
    steps: list[int],
) -> dict[str, Any]:
    """Write report.json and report.png into ``directory``; returns the JSON content."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = held_out_table(state, problems, names, config, steps)
    report = {
        **extra,
        "config": config.as_dict(),
        "updates": state.update,
        "model_evaluations": state.evaluations,
        "forward_model_evaluations": state.forward_evaluations,
        "dpmpp_2m": dpmpp_2m()[1],
        "held_out_rmse": table,
        "ratios": {name: ratios(rows) for name, rows in table.items()},
        "history": state.history,
    }
    (directory / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    plot(directory / "report.png", state.history, table, config)
    return report


def plot(path: Path, history: list[dict[str, float]], table: dict, config: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 1 + len(table), figsize=(5 * (1 + len(table)), 4), squeeze=False)
    curve = axes[0][0]
    evaluations = [h["evaluations"] for h in history if "reward" in h]
    curve.plot(evaluations, [h["reward"] for h in history if "reward" in h], lw=0.8, label="training reward")
    held = [(h["evaluations"], -h["held_out"]) for h in history if "held_out" in h]
    if held:
        curve.plot(*zip(*held, strict=True), "o-", label="minus held-out RMSE")
    curve.set(xlabel="model evaluations", ylabel="reward (minus RMSE)", title=f"training ({config.mode})")
    curve.legend()
    for axis, (name, rows) in zip(axes[0][1:], table.items(), strict=True):
        for label, values in rows.items():
            style = {"trained": "o-", "initial policy": "x--"}.get(label, ".:")
            axis.plot(list(values), list(values.values()), style, label=label)
        axis.set(xlabel="steps", ylabel="held-out consistency RMSE", yscale="log", title=name)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
