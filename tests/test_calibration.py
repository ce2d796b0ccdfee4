"""The forward-only calibrator and its guard: they recover a known multistep method, never build a graph, keep their
budget exactly, and keep whichever candidate measured best on the held-out noises, saying so."""

import json
from dataclasses import replace

import pytest
import torch

from consistency_solver.calibration import (
    CALIBRATED,
    STOCK,
    BudgetTooSmall,
    Candidate,
    SamplerProbe,
    calibrate,
    plan_noises,
    probe_sampler,
    record_run,
    source_candidate,
)
from consistency_solver.calibration import calibrator as calibrate_module
from consistency_solver.calibration.fit import greedy_fit, robust_step_weights, searched_schedule, step_weights
from consistency_solver.solver import Preset, load_coefficients, sample_consistency_solver
from consistency_solver.training.evaluation.calibrated import stock_rows
from consistency_solver.training.testbeds import get_testbed
from consistency_solver.training.trainer.cli import main

BED = get_testbed("gmm-vector-eps")
NOISES = 8


def noises(count=NOISES):
    return torch.randn(count, *BED.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def gradient_free_model(calls):
    """The bed's denoiser, counting calls, that refuses to run with autograd enabled."""

    def model(x, sigma, **extra_args):
        if torch.is_grad_enabled():
            raise AssertionError("a model call with gradients enabled")
        calls.append(x.shape[0])
        return BED.denoise(x, sigma, None)

    return model


def denoiser(calls):
    """The calibrator's denoiser(x, sigma, samples) on the bed (``sigma`` a number for the fit's own calls)."""
    model = gradient_free_model(calls)
    return lambda x, sigma, samples: model(x, torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]))


def ab2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_consistency_solver(model, x, sigmas, extra_args, callback, disable, coefficients=Preset("ab2"))


@torch.no_grad()
def heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's method as k-diffusion writes it: a predictor call at the next sigma before that step's own call."""
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i]
        if callback is not None:
            callback({"x": x, "sigma": sigmas[i]})
        predicted = x + (sigmas[i + 1] - sigmas[i]) * d
        if sigmas[i + 1] == 0:
            x = predicted
            continue
        d_next = (predicted - model(predicted, sigmas[i + 1] * x.new_ones(x.shape[0]))) / sigmas[i + 1]
        x = x + (sigmas[i + 1] - sigmas[i]) * (d + d_next) / 2
    return x


def candidates(steps, *extra):
    """Stock-like candidates on the bed's schedule: euler and ab2 as presets."""
    return [source_candidate(f"{name} / bed", STOCK, Preset(name), BED.sigmas, steps, schedule="bed")
            for name in ("euler", *extra)]  # fmt: skip


def test_a_multistep_target_on_the_same_sigmas_gives_back_its_weights():
    sigmas = BED.sigmas(5)
    calls = []
    target = record_run(ab2, gradient_free_model(calls), noises() * sigmas[0], sigmas)
    assert target.model_calls == NOISES * 5 == sum(calls)
    samples = torch.arange(NOISES)
    indices = searched_schedule(target, 5)
    assert indices == [0, 1, 2, 3, 4]  # the refine's own sigmas: nothing can follow it more closely
    fit = greedy_fit(denoiser([]), target, samples, indices)
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected[:, :2] = Preset("ab2").weights(sigmas)
    torch.testing.assert_close(fit.weights, expected, atol=1e-4, rtol=0)  # the target ran in float32
    torch.testing.assert_close(fit.final, target.finals.double(), atol=1e-5, rtol=0)


def test_the_trajectory_of_a_two_call_sampler_is_its_own_states_not_its_predictor_calls():
    sigmas = BED.sigmas(6)
    states = []
    x = noises() * sigmas[0]
    heun(gradient_free_model([]), x, sigmas, callback=lambda info: states.append(info["x"]))
    target = record_run(heun, gradient_free_model([]), x, sigmas)
    assert target.model_calls == NOISES * (2 * 6 - 1)
    torch.testing.assert_close(target.states, torch.stack(states).float())


def test_the_probe_counts_calls_and_tells_a_stochastic_sampler_without_a_model_call():
    sigmas = BED.sigmas(6)

    def ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None):
        generator = torch.Generator().manual_seed(extra_args["seed"])
        for i in range(len(sigmas) - 1):
            x = model(x, sigmas[i] * x.new_ones(x.shape[0])) + sigmas[i + 1] * torch.randn(x.shape, generator=generator)
        return x

    def own_grid(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return model(x, sigmas[0] * x.new_ones(x.shape[0]))

    class Refuses:
        def __call__(self, *args, **kwargs):
            raise AssertionError("a real model call")

    x = torch.zeros(1, *BED.shape)
    assert probe_sampler(heun, Refuses(), x, sigmas) == SamplerProbe(calls=11, deterministic=True, missed=None)
    assert probe_sampler(ab2, Refuses(), x, sigmas) == SamplerProbe(calls=6, deterministic=True, missed=None)
    assert not probe_sampler(ancestral, Refuses(), x, sigmas).deterministic
    assert probe_sampler(own_grid, Refuses(), x, sigmas).missed == pytest.approx(float(sigmas[1]))


def test_the_last_step_weights_are_the_best_that_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    columns = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    gap = columns @ torch.tensor([0.7, 0.4, -0.3], dtype=torch.float64) + 0.1 * torch.randn(200, generator=generator)
    free, last = step_weights(columns, gap, last=False), step_weights(columns, gap, last=True)
    assert abs(free.sum().item() - 0.8) < 0.05  # the unconstrained optimum does not sum to 1 here
    assert abs(last.sum().item() - 1) < 1e-12
    residual = (columns @ last - gap).square().sum()
    for direction in ([1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 1.0, -2.0]):
        for size in (1e-3, -1e-3):
            moved = last + size * torch.tensor(direction, dtype=torch.float64)
            assert (columns @ moved - gap).square().sum() > residual  # no other sum-1 weights land closer
    assert step_weights(columns[:, :1], gap, last=True).tolist() == [1.0]


@pytest.mark.parametrize("last", [False, True])
def test_a_noise_that_misses_by_far_does_not_steer_the_robust_step_fit(last):
    generator = torch.Generator().manual_seed(0)
    columns = torch.randn(16, 32, 3, generator=generator, dtype=torch.float64)  # 16 noises, 32 elements, 3 weights
    wanted = torch.tensor([1.3, -0.6, 0.3], dtype=torch.float64)  # sums to 1, so the last step can reach it
    gap = columns @ wanted + 0.01 * torch.randn(16, 32, generator=generator, dtype=torch.float64)
    gap[0] = columns[0] @ torch.tensor([4.0, 2.0, -5.0], dtype=torch.float64)  # one noise landed in another mode
    plain = step_weights(columns.flatten(0, 1), gap.flatten(), last)
    robust = robust_step_weights(columns, gap, last)
    assert (robust - wanted).norm() < 0.5 * (plain - wanted).norm()
    if last:
        assert abs(robust.sum().item() - 1) < 1e-12
    # without the outlier every noise keeps its weight: the plain least-squares fit
    torch.testing.assert_close(
        robust_step_weights(columns[1:], gap[1:], last),
        step_weights(columns[1:].flatten(0, 1), gap[1:].flatten(), last),
        atol=1e-3,
        rtol=0,
    )


def calibration_run(steps=(4, 6), budget=1500, race=None, spoil=None, monkeypatch=None):
    """A whole calibration on the bed: an ab2 refine of 20 steps, the fit raced against euler (or ``race``)."""
    calls = []
    sigmas = BED.sigmas(20)
    race = candidates(steps) if race is None else race
    plan = plan_noises(budget, 20, steps, race, sigmas[:-1])
    if spoil is not None:
        original = calibrate_module.greedy_fit
        monkeypatch.setattr(
            calibrate_module, "greedy_fit", lambda *a, **k: replace(fit := original(*a, **k), weights=spoil(fit))
        )
    target = record_run(ab2, gradient_free_model(calls), noises(plan.noises) * sigmas[0], sigmas)
    result = calibrate(denoiser(calls), target, plan, steps, race, sigma_min=BED.sigma_min, sigma_max=BED.sigma_max)
    return result, plan, calls


def test_every_model_call_runs_without_gradients_and_the_plan_is_kept():
    result, plan, calls = calibration_run()
    assert result.model_calls == sum(calls) <= plan.model_calls <= 1500
    assert plan.model_calls - result.model_calls <= (3 + 5) * (4 + plan.fit)  # at most, the schedules were one
    assert plan.held_out == round(0.4 * plan.noises) >= 4
    assert set(result.validation.winners) == {4, 6}


def test_a_larger_budget_buys_more_noises():
    race, grid = candidates((4, 6)), BED.sigmas(20)[:-1]
    small, large = plan_noises(1500, 20, (4, 6), race, grid), plan_noises(3000, 20, (4, 6), race, grid)
    assert small.noises < large.noises and small.held_out <= large.held_out
    assert small.model_calls <= 1500 and large.model_calls <= 3000


def test_the_guard_keeps_the_fit_when_it_measures_best_and_a_stock_table_when_the_fit_is_spoiled(monkeypatch):
    result, _, _ = calibration_run()
    for n, rmse in result.validation.rmse.items():
        assert result.validation.screened_out[n] == set()  # two candidates: both go on to every held-out noise
        assert result.validation.winners[n] == min(rmse, key=rmse.get)
    assert result.kinds[result.validation.winners[6]] == CALIBRATED
    assert {f"{CALIBRATED} (searched schedule)", f"{CALIBRATED} (bed schedule)"} <= set(result.validation.rmse[6])

    spoiled, _, _ = calibration_run(spoil=lambda fit: fit.weights * 0.5, monkeypatch=monkeypatch)
    assert spoiled.validation.winners == {4: "euler / bed", 6: "euler / bed"}
    sigmas = BED.sigmas(4)
    torch.testing.assert_close(spoiled.coefficients.tables[4][:, :1], Preset("euler").weights(sigmas))
    learned = spoiled.coefficients.schedule.sigmas(4, BED.sigma_min, BED.sigma_max)
    torch.testing.assert_close(learned, sigmas, rtol=1e-6, atol=1e-9)  # the winner's own schedule
    assert "At 4 steps the fit lost: the file uses euler / bed's weights and schedule." in spoiled.report()
    assert spoiled.summary()["winners"] == {"4": "euler / bed", "6": "euler / bed"}


def test_more_steps_that_measure_worse_are_named_in_the_report():
    result, _, _ = calibration_run()
    assert result.not_monotone() == []
    rmse = {n: dict(values) for n, values in result.validation.rmse.items()}
    rmse[6][result.validation.winners[6]] = 2 * rmse[4][result.validation.winners[4]]
    worse = replace(result, validation=replace(result.validation, rmse=rmse))
    assert worse.not_monotone() and worse.not_monotone()[0].startswith("6 steps measured worse than 4")
    assert f"Note: {worse.not_monotone()[0]}." in worse.report()


def test_calibrated_previews_end_fully_denoised_and_repeat_exactly():
    first, _, _ = calibration_run()
    second, _, _ = calibration_run()
    for steps in (4, 6):
        assert abs(first.coefficients.tables[steps][-1].sum().item() - 1) < 1e-12
        assert torch.equal(first.coefficients.tables[steps], second.coefficients.tables[steps])
        assert torch.equal(first.coefficients.schedule.positions[steps], second.coefficients.schedule.positions[steps])


def test_a_budget_below_the_minimum_is_refused_with_the_minimum():
    race, grid = candidates((4, 6)), BED.sigmas(20)[:-1]
    # two fit noises (each fitted on the searched and the bed's schedule), four held out (a race of three)
    smallest = calibrate_module.plan_cost(2, 4, 20, (4, 6), {4: 2, 6: 2}, 3)
    assert smallest == 6 * 20 + (3 + 5) * (2 * 2 + 2 * 2) + calibrate_module.validation_cost(3, 4, [4, 6])
    with pytest.raises(BudgetTooSmall, match=f"raise the budget to at least {smallest} model calls") as error:
        plan_noises(smallest - 1, 20, (4, 6), race, grid)
    assert error.value.minimum == smallest
    assert plan_noises(smallest, 20, (4, 6), race, grid).noises == 6


def test_a_candidate_without_a_step_count_sits_that_count_out():
    only = Candidate("only 4", STOCK, {4: BED.sigmas(4)}, {4: Preset("euler").weights(BED.sigmas(4))})
    result, _, _ = calibration_run(race=[only, *candidates((4, 6))])
    assert "only 4" in result.validation.rmse[4] and "only 4" not in result.validation.rmse[6]


def test_the_trainer_calibrates_a_bed_within_its_budget_and_reports_against_stock_samplers(tmp_path):
    output = tmp_path / "calibrated.safetensors"
    argv = [
        "--bed", "gmm-vector-eps", "--mode", "calibrate", "--steps", "4,6", "--budget", "1200",
        "--held-out-count", "16", "--output", str(output),
    ]  # fmt: skip
    main(argv)
    loaded = load_coefficients(output)
    assert sorted(loaded.tables) == [4, 6] and loaded.row_sums == "free" and sorted(loaded.schedule.positions) == [4, 6]
    training = json.loads(loaded.metadata["training"])
    assert training["mode"] == "calibrate" and training["model_calls"] <= 1200
    assert set(training["winners"]) == {"4", "6"} and training["noises"]["held_out"] >= 4
    report = json.loads((tmp_path / "calibrated" / "report.json").read_text())
    rows = report["held_out_rmse"]
    assert "calibrated" in rows and stock_rows(rows)
    assert set(report["ratios"]) == {"4", "6"}


def test_the_trainer_refuses_a_calibration_budget_below_the_minimum(tmp_path):
    argv = ["--bed", "gmm-vector-eps", "--mode", "calibrate", "--steps", "5,8", "--budget", "100",
            "--output", str(tmp_path / "x.safetensors")]  # fmt: skip
    with pytest.raises(SystemExit, match="raise the budget to at least .* model calls"):
        main(argv)
    assert not (tmp_path / "x.safetensors").exists()
