"""README's results summary: the table and plot made from the benchmarks' JSON."""

import json

import pytest

from consistency_solver.training.evaluation import summary


def judged(rmse, best_stock, best_stock_rmse, users_rmse):
    return {"rmse": rmse, "best_stock": best_stock, "best_stock_rmse": best_stock_rmse, "users_rmse": users_rmse}


BENCHMARK = {
    "fashion-eps-cfg": {
        "defaults": {
            "default-eps": {
                "karras": {"5": judged(0.13, "ipndm_v", 0.15, 0.22), "8": judged(0.05, "ipndm_v", 0.055, 0.072)},
                "consistency_solver": {"5": judged(0.12, "deis", 0.14, 0.22), "8": judged(0.049, "deis", 0.06, 0.072)},
            }
        }
    },
    "fashion-flow-cfg": {
        "defaults": {
            "default-flow": {
                "simple": {"5": judged(0.11, "ipndm", 0.12, 0.15)},
                "consistency_solver": {"5": judged(0.10, "ipndm", 0.12, 0.15)},
            }
        }
    },
    "overhead_seconds_per_step": {"a": 1e-4, "b": 1e-4},
}


def calibrated(bed, label, same_5, same_8):
    """A calibration benchmark cell: the calibrated file's multiple of the best stock sampler, same prompt."""
    return {"bed": bed, "class": label, "same": {"5": {"vs_stock": same_5}, "8": {"vs_stock": same_8}},
            "other": {"5": {"vs_stock": 9.0}, "8": {"vs_stock": 9.0}}}  # fmt: skip


# Two one-prompt calibrations of the EPS bed, averaged; the several-prompts comparison, left out.
CALIBRATION = {
    "cells": [calibrated("fashion-eps-cfg", 0, 0.70, 0.80), calibrated("fashion-eps-cfg", 3, 0.80, 0.90)],
    "prompts": [{"bed": "fashion-eps-cfg", "three": {"5": {"vs_stock": 0.1}}, "one": {"5": {"vs_stock": 0.1}}}],
}


def test_the_summary_sets_each_preview_against_the_best_stock_sampler(tmp_path, capsys):
    table = summary.cells(BENCHMARK, CALIBRATION)
    assert set(table) == {"fashion-eps-cfg", "fashion-flow-cfg"} and set(table["fashion-flow-cfg"]) == {5}
    eps = table["fashion-eps-cfg"][5]
    # The default on its learned schedule; the stock samplers on the stock schedule users pick.
    assert (eps.default, eps.best_stock, eps.best_stock_name, eps.users) == (0.12, 0.15, "ipndm_v", 0.22)
    assert eps.users_name == "dpmpp_2m on karras" and table["fashion-flow-cfg"][5].users_name == "euler on simple"
    assert eps.calibrated == pytest.approx(0.75) and table["fashion-flow-cfg"][5].calibrated is None
    text = summary.markdown(table)
    eps_row = "| fashion-eps-cfg | 5 | 0.220 (dpmpp_2m on karras, 1.47x) | 0.150 (ipndm_v) | 0.120 (0.80x) | 0.75x |"
    assert eps_row in text
    assert "| fashion-flow-cfg | 5 | 0.150 (euler on simple, 1.25x) | 0.120 (ipndm) | 0.100 (0.83x) | — |" in text

    files = {"benchmark": tmp_path / "results.json", "calibration": tmp_path / "calibration.json"}
    files["benchmark"].write_text(json.dumps(BENCHMARK))
    files["calibration"].write_text(json.dumps(CALIBRATION))
    plot = tmp_path / "images" / "results.png"
    summary.main([str(files["benchmark"]), "--calibration", str(files["calibration"]), "--plot", str(plot)])
    assert capsys.readouterr().out.startswith(text) and plot.stat().st_size > 10_000


def test_without_a_calibration_benchmark_the_table_has_no_calibrated_column():
    text = summary.markdown(summary.cells(BENCHMARK, None))
    assert text.splitlines()[0].endswith("| default file, learned schedule |") and "—" not in text


def test_a_benchmark_without_judged_defaults_is_refused_naming_the_file(tmp_path, capsys):
    empty = tmp_path / "results.json"
    empty.write_text(json.dumps({"overhead_seconds_per_step": {}}))
    with pytest.raises(SystemExit):
        summary.main([str(empty)])
    assert f"{empty} judges no default" in capsys.readouterr().err


def test_runs_of_different_beds_make_one_table(tmp_path, capsys):
    eps, flow = tmp_path / "eps.json", tmp_path / "flow.json"
    eps.write_text(json.dumps({"fashion-eps-cfg": BENCHMARK["fashion-eps-cfg"]}))
    flow.write_text(json.dumps({"fashion-flow-cfg": BENCHMARK["fashion-flow-cfg"]}))
    summary.main([str(eps), str(flow)])
    assert capsys.readouterr().out == summary.markdown(summary.cells(BENCHMARK, None))
