"""The benchmark end to end in its --quick configuration, with coefficient files the test writes itself."""

import json

import pytest
import torch

from consistency_solver.solver import (
    ConsistencyPolicy,
    PolicyCoefficients,
    Preset,
    StepSchedule,
    TableCoefficients,
    sample_consistency_solver,
    save_coefficients,
)
from consistency_solver.training.evaluation import benchmark, stock_samplers
from consistency_solver.training.testbeds import get_testbed

torch.set_num_threads(1)  # the cores are shared; one thread is faster than two contended ones


def write_files(folder):
    table = folder / "table-ab2.safetensors"
    weights = Preset("ab2").weights(get_testbed("gmm-vector-eps-cfg").sigmas(4))
    save_coefficients(table, TableCoefficients(tables={4: weights}, order=2), model_family="gmm-eps")
    policy = folder / "policy-flow.safetensors"
    untrained = PolicyCoefficients(ConsistencyPolicy(order=3, bins=5, hidden=8), "log_sigma", trained_steps=(4,))
    save_coefficients(policy, untrained, model_family="gmm-flow")
    return table, policy


def test_quick_benchmark_writes_tables_plots_and_numbers(tmp_path, capsys):
    table, policy = write_files(tmp_path)
    out = tmp_path / "out"
    benchmark.main(["--quick", "--out", str(out), "--coefficients", str(table), str(policy)])
    printed = capsys.readouterr().out
    markdown = (out / "benchmark.md").read_text()
    assert printed.strip() and "| sampler | 4 steps | 6 steps |" in markdown
    assert f"thread(s) used, torch {torch.__version__}" in markdown  # the tables say when and where they were made
    results = json.loads((out / "results.json").read_text())
    eps, flow = results["gmm-vector-eps-cfg"], results["gmm-vector-flow-cfg"]
    # Files only rank on beds of their model family; a table has no cells for step counts it lacks.
    assert "ConsistencySolver (table-ab2)" in eps["rows"] and "ConsistencySolver (table-ab2)" not in flow["rows"]
    assert eps["rows"]["ConsistencySolver (table-ab2)"]["6"] is None
    assert "ConsistencySolver (policy-flow)" in flow["rows"]
    assert "`*`: a step count the policy was not trained for." in markdown  # the policy at 6 steps
    rmse, sliced_w2, mode_tv, median = eps["rows"]["preset ab4"]["6"]
    assert 0 < rmse < 1 and sliced_w2 > 0 and 0 <= mode_tv <= 1
    assert 0 < median < 1
    assert "(median per-sample RMSE)" in markdown
    live = next(label for label in eps["rows"] if label.startswith("live preview"))
    assert eps["rows"][live]["4"][0] > eps["rows"][live]["6"][0]  # later previews are closer to the final
    # The table's 4-step cell is the ab2 preset's: the same weights (from float64 rather than float32 sigmas).
    assert eps["rows"]["ConsistencySolver (table-ab2)"]["4"] == pytest.approx(eps["rows"]["preset ab2"]["4"], rel=1e-4)
    assert len(results["overhead_seconds_per_step"]) == 2
    # The bundled defaults are judged on each bed on both schedules, in one table.
    assert (
        set(eps["defaults"]["default-eps"]) == {"karras", "consistency_solver"}
        and "default-eps" not in flow["defaults"]
    )
    assert set(flow["defaults"]["default-flow"]) == {"simple", "consistency_solver"}
    assert "| gmm-vector-flow-cfg | default-flow | 6 | simple |" in markdown
    for bed in ("gmm-vector-eps-cfg", "gmm-vector-flow-cfg"):
        assert (out / f"{bed}.png").stat().st_size > 10_000


def test_defaults_only_judges_the_bundled_defaults_at_5_and_8_steps_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    benchmark.main(["--defaults-only", "--beds", "gmm-vector-eps-cfg", "--samples", "16", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())["gmm-vector-eps-cfg"]
    solver_rows = {label for label in results["rows"] if label.startswith("ConsistencySolver")}
    assert solver_rows == {
        "ConsistencySolver (default-eps, learned schedule)",
        "ConsistencySolver (default-eps, bed's schedule)",
    }
    assert not any(label.startswith(("preset", "live preview")) for label in results["rows"])
    assert {steps for cells in results["rows"].values() for steps in cells} == {"5", "8"}
    assert set(results["defaults"]["default-eps"]["karras"]) == {"5", "8"}


def test_steps_to_match_says_how_far_a_row_could_go():
    references = torch.zeros(4, 2)
    close = torch.full((4, 2), 0.1)
    dpm = benchmark.Row(benchmark.stock_samplers.dpmpp_2m()[1], lambda steps: close)
    # A table trained for 2-6 steps, never within dpmpp_2m's RMSE; a policy that matches it at 9 steps.
    table = benchmark.Row("ConsistencySolver (table)", lambda steps: close * 2 if steps <= 6 else None)
    policy = benchmark.Row("ConsistencySolver (policy)", lambda steps: close if steps >= 9 else close * 3)
    result = benchmark.BedResult("bed", ("a", "b"))
    benchmark.steps_to_match([dpm], [table, policy], references, {}, result)
    assert result.steps_to_match["ConsistencySolver (policy)"] == {10: 9, 20: 9}
    markdown = benchmark.bed_table(result, ())
    assert "| ConsistencySolver (table) | > 6 | > 6 |" in markdown
    assert "| ConsistencySolver (policy) | 9 | 9 |" in markdown


def test_stock_rows_are_marked_absent_without_comfyui(tmp_path, monkeypatch):
    monkeypatch.setattr(stock_samplers, "comfy_unavailable_reason", lambda: "ComfyUI not importable: test")
    out = tmp_path / "out"
    benchmark.main(["--quick", "--beds", "gmm-vector-eps-cfg", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())["gmm-vector-eps-cfg"]
    learned = " (default-eps's learned schedule)"
    expected = {f"ComfyUI {name}{suffix}" for name in stock_samplers.STOCK_SAMPLERS for suffix in ("", learned)}
    assert set(results["absent"]) == expected
    assert "dpmpp_2m (project reimplementation)" in results["rows"]
    # The default is still judged, against the reimplementation on each schedule.
    judged = results["defaults"]["default-eps"]["karras"]["4"]
    assert judged["best_stock"] == "dpmpp_2m" and judged["users_rmse"] == judged["best_stock_rmse"]
    assert "absent (ComfyUI not importable: test)" in (out / "benchmark.md").read_text()


def test_matched_real_images_follow_the_label_mix_and_stay_disjoint():
    images = torch.arange(40.0).reshape(40, 1, 1, 1)
    image_labels = torch.arange(40) % 4
    labels = torch.tensor([0, 3, 0])
    reference, held_back = benchmark.matched_real_images(images, image_labels, labels, per_sample=2)
    assert sorted(reference.flatten().tolist()) == [0, 3, 4, 7, 8, 12]
    assert held_back.flatten().tolist() == [16, 11, 20]  # class 0, 3, 0: aligned with the labels


def test_a_file_with_a_learned_schedule_runs_on_it(tmp_path):
    bed = get_testbed("gmm-vector-eps-cfg")
    schedule = StepSchedule({4: torch.tensor([0.0, 0.2, 0.5, 0.8], dtype=torch.float64)})
    table = TableCoefficients(tables={4: Preset("ab2").weights(bed.sigmas(4))}, order=2, schedule=schedule)
    path = tmp_path / "scheduled.safetensors"
    save_coefficients(path, table, model_family="gmm-eps")
    noise = torch.randn(8, *bed.shape, generator=torch.Generator().manual_seed(0))
    labels = bed.sample_labels(8, torch.Generator().manual_seed(1))
    model = bed.model(labels)
    row, on_default = benchmark.consistency_rows(bed, noise, labels, [path])
    assert row.label == "ConsistencySolver (scheduled, learned schedule)"
    assert on_default.label == "ConsistencySolver (scheduled, bed's schedule)"
    plain = sample_consistency_solver(
        model, bed.initial_state(noise, bed.sigmas(4)), bed.sigmas(4).float(), disable=True, coefficients=table
    )
    assert torch.equal(on_default.run(4), plain)
    sigmas = schedule.sigmas(4, bed.sigma_min, bed.sigma_max).float()
    assert float(sigmas[-2]) > 2 * bed.sigma_min  # position 0.8 stops short of sigma_min
    expected = sample_consistency_solver(
        model, bed.initial_state(noise, sigmas), sigmas, disable=True, coefficients=table
    )
    assert torch.equal(row.run(4), expected)
    assert row.run(6) is None  # no schedule for 6 steps: no cell, as for a table without that step count


def test_the_defaults_are_judged_on_both_schedules_against_the_stock_samplers_on_each(tmp_path, comfy_samplers):
    # The judgement against ComfyUI's own samplers needs them; without ComfyUI the rows are absent (tested above).
    bed = get_testbed("gmm-vector-eps-cfg")
    # uni_pc asks a schedule for one step more than it takes (KSampler drops the penultimate sigma)
    schedule = StepSchedule({n: torch.linspace(0, 0.9, n, dtype=torch.float64) for n in (4, 5)})
    tables = {n: Preset("ab2").weights(bed.sigmas(n)) for n in (4, 5)}
    table = TableCoefficients(tables=tables, order=2, schedule=schedule)
    path = tmp_path / "judged.safetensors"
    save_coefficients(path, table, model_family="gmm-eps")
    result = benchmark.evaluate_bed(bed, 16, (4,), [path], match=False, log=print, judged=[path], judged_only=True)
    stock = list(stock_samplers.stock_comparison(bed.sigmas))
    learned = [f"{label} (judged's learned schedule)" for label in stock]
    assert set(result.rows) == {
        "ConsistencySolver (judged, learned schedule)",
        "ConsistencySolver (judged, bed's schedule)",
        *stock,
        *learned,
    }  # judged_only: no presets, no live preview
    judged = benchmark.judgements(result, "judged")
    assert set(judged) == {"karras", "consistency_solver"}
    dpmpp_2m_on_karras = result.rows["ComfyUI dpmpp_2m"][4][0]
    for schedule_name, rows in (("karras", stock), ("consistency_solver", learned)):
        cell = judged[schedule_name][4]
        stock_rmse = {benchmark.stock_name(label): result.rows[label][4][0] for label in rows}
        assert cell.best_stock_rmse == min(stock_rmse.values()) and stock_rmse[cell.best_stock] == cell.best_stock_rmse
        # The users' sampler is what they run today: dpmpp_2m on karras, whichever schedule the file is judged on.
        assert cell.users_rmse == dpmpp_2m_on_karras and cell.to_users == cell.rmse / cell.users_rmse
    assert result.rows[learned[stock.index("ComfyUI dpmpp_2m")]][4][0] != dpmpp_2m_on_karras
    assert judged["karras"][4].rmse == result.rows["ConsistencySolver (judged, bed's schedule)"][4][0]
    table_text = benchmark.judgement_table({bed.name: result})
    assert "| gmm-vector-eps-cfg | judged | 4 | consistency_solver |" in table_text
    assert "| gmm-vector-eps-cfg | judged | 4 | karras |" in table_text


def test_a_judgement_without_the_users_sampler_has_no_ratio_to_it_and_stock_names_come_from_labels():
    cell = benchmark.Judgement(0.1, "ipndm", 0.2, None)
    assert cell.to_best == 0.5 and cell.to_users is None
    assert benchmark.stock_name("ComfyUI uni_pc_bh2 (default-flow's learned schedule)") == "uni_pc_bh2"
    assert benchmark.stock_name("dpmpp_2m (project reimplementation)") == "dpmpp_2m"
