"""The forward-only calibrator: it recovers a known multistep method, never builds a graph, and keeps its budget."""

import json

import pytest
import torch

from consistency_solver.solver import Preset, load_coefficients, sample_consistency_solver
from consistency_solver.training.calibration import (
    BudgetTooSmall,
    calibrate,
    calibrate_model,
    minimum_budget,
    record_run,
)
from consistency_solver.training.calibration.calibrator import robust_step_weights, step_weights
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


def ab2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_consistency_solver(model, x, sigmas, extra_args, callback, disable, coefficients=Preset("ab2"))


def test_a_multistep_target_on_the_same_sigmas_gives_back_its_weights():
    sigmas = BED.sigmas(5)
    calls = []
    target = record_run(ab2, gradient_free_model(calls), noises() * sigmas[0], sigmas)
    assert target.model_calls == NOISES * 5 == sum(calls)
    result = calibrate(
        lambda x, sigma, samples: BED.denoise(x, sigma, None),
        target,
        [5],
        budget=2000,
        sigma_min=BED.sigma_min,
        sigma_max=BED.sigma_max,
    )
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected[:, :2] = Preset("ab2").weights(sigmas)
    torch.testing.assert_close(result.coefficients.tables[5], expected, atol=1e-4, rtol=0)  # the target ran in float32
    learned = result.coefficients.schedule.sigmas(5, BED.sigma_min, BED.sigma_max)
    torch.testing.assert_close(learned, sigmas, atol=1e-6, rtol=1e-4)
    assert result.fit_rmse[5][1] < 1e-6


def test_every_model_call_runs_without_gradients_and_the_budget_is_kept():
    calls = []
    sigmas = BED.sigmas(20)
    result = calibrate_model(
        gradient_free_model(calls),
        noises() * sigmas[0],
        sigmas,
        ab2,
        [4, 6],
        budget=1500,
        sigma_min=BED.sigma_min,
        sigma_max=BED.sigma_max,
        end_to_end=True,
        jacobian_noises=4,
    )
    assert result.model_calls == sum(calls) <= 1500
    assert result.rounds >= 1  # Gauss-Newton ran (its Jacobian sweeps call the model too)
    for steps, (start, best) in result.fit_rmse.items():
        assert best <= 1.1 * start  # no calibration noise may get more than 10 % worse
        table = result.coefficients.tables[steps]
        assert table.shape == (steps, 4)
        assert abs(table[-1].sum().item() - 1) < 1e-12  # Gauss-Newton keeps the last step fully denoising


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


def test_calibrated_previews_end_fully_denoised_and_repeat_exactly():
    sigmas = BED.sigmas(20)
    target = record_run(ab2, gradient_free_model([]), noises(32) * sigmas[0], sigmas)
    runs = [
        calibrate(
            lambda x, sigma, samples: BED.denoise(x, sigma, None),
            target,
            [3, 5],
            budget=2000,
            sigma_min=BED.sigma_min,
            sigma_max=BED.sigma_max,
        )
        for _ in range(2)
    ]
    first, second = (run.coefficients for run in runs)
    for steps in (3, 5):
        assert abs(first.tables[steps][-1].sum().item() - 1) < 1e-12
        assert torch.equal(first.tables[steps], second.tables[steps])
        assert torch.equal(first.schedule.positions[steps], second.schedule.positions[steps])


def test_a_budget_below_the_minimum_is_refused_before_any_model_call():
    calls = []
    sigmas = BED.sigmas(20)
    minimum = minimum_budget(NOISES * 20, NOISES, [4, 6])
    assert minimum == NOISES * 20 + NOISES * (3 + 5)
    with pytest.raises(BudgetTooSmall, match=f"raise the budget to at least {minimum} model calls") as error:
        calibrate_model(
            gradient_free_model(calls),
            noises() * sigmas[0],
            sigmas,
            ab2,
            [4, 6],
            budget=minimum - 1,
            sigma_min=BED.sigma_min,
            sigma_max=BED.sigma_max,
        )
    assert error.value.minimum == minimum
    assert calls == []


def test_the_trainer_calibrates_a_bed_within_its_budget_and_reports_against_stock_samplers(tmp_path):
    output = tmp_path / "calibrated.safetensors"
    argv = [
        "--bed", "gmm-vector-eps", "--mode", "calibrate", "--steps", "4,6", "--budget", "700",
        "--calibration-noises", "8", "--end-to-end", "--held-out-count", "16", "--output", str(output),
    ]  # fmt: skip
    main(argv)
    loaded = load_coefficients(output)
    assert sorted(loaded.tables) == [4, 6] and loaded.row_sums == "free" and sorted(loaded.schedule.positions) == [4, 6]
    training = json.loads(loaded.metadata["training"])
    assert training["mode"] == "calibrate" and 8 * 40 + 8 * (3 + 5) <= training["model_calls"] <= 700
    report = json.loads((tmp_path / "calibrated" / "report.json").read_text())
    rows = report["held_out_rmse"]
    assert {"calibrated", "preset ab4"} <= set(rows) and stock_rows(rows)
    assert set(report["ratios"]) == {"4", "6"}


def test_the_trainer_refuses_a_calibration_budget_below_the_minimum(tmp_path):
    argv = ["--bed", "gmm-vector-eps", "--mode", "calibrate", "--steps", "5,8", "--budget", "100",
            "--calibration-noises", "8", "--output", str(tmp_path / "x.safetensors")]  # fmt: skip
    with pytest.raises(SystemExit, match="raise the budget to at least 408 model calls"):
        main(argv)
    assert not (tmp_path / "x.safetensors").exists()
