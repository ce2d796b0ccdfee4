"""The sampler and the coefficient sources, checked on a Gaussian data distribution with a closed-form ODE solution."""

import dataclasses
import math

import pytest
import torch

from consistency_solver.solver import (
    ConsistencyPolicy,
    PolicyCoefficients,
    Preset,
    TableCoefficients,
    actions_to_weights,
    active_action_mask,
    adams_bashforth_weights,
    coefficient_table,
    sample_consistency_solver,
    time_features,
    to_d,
)
from consistency_solver.solver.errors import (
    InvalidWeights,
    UnknownChoice,
    UntrainedStepCount,
    check_choice,
    format_steps,
    parse_step_counts,
)
from consistency_solver.solver.schedules import DiscreteSchedule, karras_sigmas

MEAN, STD = 0.3, 1.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma*eps] for x0 ~ N(MEAN, STD^2) per element (EPS / VE convention)."""
    sigma = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (STD**2 * x + sigma**2 * MEAN) / (STD**2 + sigma**2)


def exact_final(x_start: torch.Tensor, sigma_start: float, sigma_end: float = 0.0) -> torch.Tensor:
    """The probability-flow ODE solution from sigma_start to sigma_end: the deviation from MEAN scales with the std."""
    scale = math.sqrt(STD**2 + sigma_end**2) / math.sqrt(STD**2 + sigma_start**2)
    return MEAN + (x_start - MEAN) * scale


def smooth_sigmas(steps: int, sigma_max: float = 20.0, rho: float = 2.0) -> torch.Tensor:
    """sigma = sigma_max (1 - t)^rho on a uniform t grid: smooth down to 0, so multistep orders show cleanly."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return sigma_max * (1 - t) ** rho


def sample(coefficients, sigmas, x, **kwargs):
    return sample_consistency_solver(gaussian_denoiser, x, sigmas, disable=True, coefficients=coefficients, **kwargs)


def final_error(preset: str, steps: int, sigmas_fn=smooth_sigmas) -> float:
    sigmas = sigmas_fn(steps)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sigmas[0])
    error = sample(Preset(preset), sigmas, x) - exact_final(x, float(sigmas[0]))
    return error.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("preset, order", [("euler", 1), ("ab2", 2), ("ab3", 3), ("ab4", 4)])
def test_presets_converge_at_their_order(preset, order):
    errors = [final_error(preset, steps) for steps in (40, 80, 160)]
    rates = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    assert abs(rates[-1] - order) < 0.5, (errors, rates)
    assert errors[-1] < errors[0]


def test_ipndm_is_ab4_on_an_equal_step_grid_and_converges_at_order_4():
    uniform = torch.linspace(20.0, 0.0, 31, dtype=torch.float64)
    torch.testing.assert_close(Preset("ipndm").weights(uniform), adams_bashforth_weights(uniform, 4))
    errors = [
        final_error("ipndm", steps, lambda n: torch.linspace(20.0, 0.0, n + 1, dtype=torch.float64))
        for steps in (80, 160)
    ]
    assert abs(math.log2(errors[0] / errors[1]) - 4) < 0.6, errors


@pytest.mark.parametrize("order", [2, 3, 4])
def test_adams_bashforth_step_is_exact_for_polynomial_derivatives(order):
    """With exact history, one AB-k step integrates a derivative of degree k-1 in sigma exactly."""
    sigmas = karras_sigmas(6, 0.03, 14.6)
    table = adams_bashforth_weights(sigmas, order)
    coefficients = torch.randn(order, dtype=torch.float64, generator=torch.Generator().manual_seed(order))

    def derivative(s):
        return sum(c * s**p for p, c in enumerate(coefficients))

    def antiderivative(s):
        return sum(c * s ** (p + 1) / (p + 1) for p, c in enumerate(coefficients))

    for i in range(order - 1, len(sigmas) - 1):
        history = [derivative(sigmas[i - j]) for j in range(order)]
        step = (sigmas[i + 1] - sigmas[i]) * sum(w * d for w, d in zip(table[i], history, strict=True))
        exact = antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])
        assert abs(step - exact) < 1e-9 * max(1.0, abs(exact))


def test_every_preset_row_sums_to_one_and_uses_only_available_history():
    sigmas = karras_sigmas(7, 0.0292, 14.6146)
    for name in ("euler", "ab2", "ab3", "ab4", "ipndm"):
        table = Preset(name).weights(sigmas)
        torch.testing.assert_close(table.sum(dim=1), torch.ones(7, dtype=torch.float64))
        for i in range(7):
            assert (table[i, i + 1 :] == 0).all()


def test_euler_preset_is_a_hand_written_ddim_step_bit_for_bit():
    sigmas = karras_sigmas(6, 0.0292, 14.6146).float()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    expected = x.clone()
    for i in range(len(sigmas) - 1):
        denoised = gaussian_denoiser(expected, sigmas[i] * torch.ones(3))
        derivative = (expected - denoised) / sigmas[i]
        expected = expected + derivative * (sigmas[i + 1] - sigmas[i])
    assert torch.equal(sample(Preset("euler"), sigmas, x), expected)


def identity_policy(order: int = 4, bins: int = 11) -> ConsistencyPolicy:
    """A policy whose argmax actions give the weights [1, 0, 0, 0] at every step."""
    policy = ConsistencyPolicy(order=order, bins=bins, hidden=16)
    with torch.no_grad():
        bias = torch.zeros(order - 1, bins)
        for dim in range(order - 1):
            bias[dim, (policy.action_values[dim] == 0).nonzero().item()] = 5.0
        policy.mlp[4].bias.copy_(bias.flatten())
    return policy


def test_policy_with_identity_coefficients_equals_euler():
    sigmas = karras_sigmas(8, 0.0292, 14.6146).float()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    policy = PolicyCoefficients(identity_policy(), time_features="log_sigma", trained_steps=(8,))
    table = coefficient_table(policy, sigmas)
    assert (table[:, 0] == 1).all() and (table[:, 1:] == 0).all()
    assert torch.equal(sample(policy, sigmas, x), sample(Preset("euler"), sigmas, x))


def test_actions_to_weights_follows_the_papers_rule():
    actions = torch.tensor([[0.4, -0.6, 0.2]] * 4, dtype=torch.float64)
    weights = actions_to_weights(actions, torch.tensor([1, 2, 3, 4]))
    expected = torch.tensor(
        [[1, 0, 0, 0], [1.4, -0.4, 0, 0], [1.4, -0.6, 0.2, 0], [1.4, -0.6, 0.2, 0.0]], dtype=torch.float64
    )
    expected[3, 3] = 1 - (1.4 - 0.6 + 0.2)
    torch.testing.assert_close(weights, expected)
    mask = active_action_mask(torch.tensor([1, 2, 3, 4]), order=4)
    assert mask.tolist() == [[False] * 3, [True, False, False], [True, True, False], [True, True, True]]


def test_expectation_mode_of_a_uniform_policy_is_the_grid_mean():
    policy = PolicyCoefficients(ConsistencyPolicy(order=2, bins=5, hidden=8), "log_sigma", (4,), mode="expectation")
    table = policy.weights(karras_sigmas(4, 0.03, 14.6))
    torch.testing.assert_close(table[1:], torch.tensor([[2.0, -1.0]] * 3, dtype=torch.float64))


def test_fp16_state_matches_float32_within_tolerance():
    sigmas = karras_sigmas(8, 0.0292, 14.6146)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * float(sigmas[0])
    reference = sample(Preset("ab4"), sigmas, x)
    half = sample(Preset("ab4"), sigmas, x.half())
    assert half.dtype == torch.float16
    assert (half.float() - reference).abs().max() < 2e-2
    if hasattr(torch, "bfloat16"):
        assert (sample(Preset("ab4"), sigmas, x.bfloat16()).float() - reference).abs().max() < 1e-1


def test_zero_steps_return_the_input_and_call_nothing():
    calls = []
    x = torch.randn(2, 3)
    out = sample_consistency_solver(lambda *a, **k: calls.append(1), x, torch.tensor([1.0]), coefficients=Preset("ab4"))
    assert torch.equal(out, x) and not calls


def test_partial_sigmas_start_midway_and_need_not_end_at_zero():
    sigmas = torch.linspace(2.0, 0.5, 101, dtype=torch.float64)
    x = exact_final(torch.randn(16, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 20, 20.0, 2.0)
    out = sample(Preset("ab4"), sigmas, x)
    # The error is the Euler warm-up step's O(h^2); the start itself is exact.
    torch.testing.assert_close(out, exact_final(x, 2.0, 0.5), atol=1e-4, rtol=0)


def test_video_latents_and_batches_are_sampled_per_item():
    sigmas = karras_sigmas(5, 0.0292, 14.6146)
    x = torch.randn(3, 4, 2, 8, 8, generator=torch.Generator().manual_seed(5)) * float(sigmas[0])
    out = sample(Preset("ab3"), sigmas, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[1:2], sample(Preset("ab3"), sigmas, x[1:2]))


def test_callback_runs_once_per_step_with_the_k_diffusion_keys():
    sigmas = karras_sigmas(5, 0.0292, 14.6146)
    seen = []
    sample_consistency_solver(
        gaussian_denoiser, torch.randn(2, 3), sigmas, callback=seen.append, disable=True, coefficients=Preset("ab2")
    )
    assert [event["i"] for event in seen] == list(range(5))
    assert all(set(event) == {"x", "i", "sigma", "sigma_hat", "denoised"} for event in seen)


def test_extra_args_reach_the_model():
    received = []

    def model(x, sigma, **extra):
        received.append(extra)
        return torch.zeros_like(x)

    sample_consistency_solver(
        model, torch.ones(1, 2), torch.tensor([1.0, 0.0]), {"seed": 7}, coefficients=Preset("euler")
    )
    assert received == [{"seed": 7}]


def test_table_coefficients_refuse_step_counts_they_do_not_have():
    table = TableCoefficients({2: torch.tensor([[1.0, 0.0], [1.5, -0.5]], dtype=torch.float64)}, order=2)
    sample(table, torch.tensor([3.0, 1.0, 0.0]), torch.randn(1, 2))
    with pytest.raises(UntrainedStepCount, match="table was trained for 2 steps, not 3") as error:
        sample(table, torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.randn(1, 2))
    assert (error.value.what, error.value.asked, error.value.trained) == ("table", 3, (2,))


@pytest.mark.parametrize(
    ("text", "counts"), [("4-12", tuple(range(4, 13))), ("8,5,5", (5, 8)), (" 4-6, 8,", (4, 5, 6, 8))]
)
def test_step_lists_read_as_ranges_and_lists_and_print_back(text, counts):
    assert parse_step_counts(text) == counts
    assert parse_step_counts(format_steps(counts)) == counts


@pytest.mark.parametrize("text", ["", ",", "0-3", "-3", "5-4", "1.5", "5,,x"])
def test_a_step_list_without_counts_of_at_least_1_is_refused_showing_the_form(text):
    with pytest.raises(ValueError, match=f"4-12 or 5,8 \\(got {text!r}\\)"):
        parse_step_counts(text)


def test_a_table_that_does_not_sum_to_one_is_refused_before_sampling():
    table = TableCoefficients({2: torch.tensor([[1.0, 0.0], [1.5, -0.4]], dtype=torch.float64)}, order=2)
    with pytest.raises(ValueError, match="sum to 1"):
        sample(table, torch.tensor([3.0, 1.0, 0.0]), torch.randn(1, 2))


def test_a_free_row_sums_table_scales_each_step_by_its_row_sum():
    sigmas = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    scales = torch.tensor([0.8, 1.3], dtype=torch.float64)
    ab2 = torch.tensor([[1.0, 0.0], [1.5, -0.5]], dtype=torch.float64)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, history = x.clone(), []
    for i, scale in enumerate(scales):
        history = [(expected - gaussian_denoiser(expected, sigmas[i] * torch.ones(2))) / sigmas[i], *history]
        blended = sum(weight * derivative for weight, derivative in zip(ab2[i], history, strict=False))
        expected = expected + scale * (sigmas[i + 1] - sigmas[i]) * blended
    free = TableCoefficients({2: ab2 * scales.unsqueeze(1)}, order=2, row_sums="free")
    torch.testing.assert_close(sample(free, sigmas, x), expected)


def test_free_row_sums_must_be_positive_and_named():
    backwards = TableCoefficients({2: torch.tensor([[1.0, 0.0], [-0.5, 0.0]], dtype=torch.float64)}, 2, row_sums="free")
    with pytest.raises(ValueError, match="positive step scales"):
        sample(backwards, torch.tensor([3.0, 1.0, 0.0]), torch.randn(1, 2))
    with pytest.raises(ValueError, match="unknown row_sums 'any'"):
        TableCoefficients({}, 2, row_sums="any")


def test_policy_refuses_untrained_step_counts_unless_allowed():
    policy = PolicyCoefficients(ConsistencyPolicy(order=3, bins=5, hidden=8), "log_sigma", (4, 5, 6))
    with pytest.raises(UntrainedStepCount, match="trained for 4-6 steps, not 9") as error:
        policy.weights(karras_sigmas(9, 0.03, 14.6))
    assert (error.value.what, error.value.asked, error.value.trained) == ("policy", 9, (4, 5, 6))
    assert "allow_untrained_steps" not in str(error.value)
    allowed = PolicyCoefficients(policy.policy, "log_sigma", (4, 5, 6), allow_untrained_steps=True)
    assert allowed.weights(karras_sigmas(9, 0.03, 14.6)).shape == (9, 3)


def test_sd15_time_features_reproduce_the_papers_conditioning():
    schedule = DiscreteSchedule()
    features = time_features(schedule.trailing_sigmas(8), "sd15_timestep", schedule.timestep)
    timesteps = [999, 874, 749, 624, 499, 374, 249, 124]
    torch.testing.assert_close(features[:, 0], torch.tensor(timesteps, dtype=torch.float64) / 999)
    torch.testing.assert_close(features[:, 1], (torch.tensor(timesteps, dtype=torch.float64) - 125) / 999)
    with pytest.raises(ValueError, match="model_sampling"):
        time_features(schedule.trailing_sigmas(8), "sd15_timestep")


def test_log_sigma_features_stay_finite_at_the_final_zero():
    features = time_features(karras_sigmas(4, 0.0292, 14.6146), "log_sigma")
    assert torch.isfinite(features).all() and features[-1, 1] == math.log(1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    sigmas = karras_sigmas(6, 0.0292, 14.6146)
    x = torch.randn(2, 4, 8, 8) * float(sigmas[0])
    cpu = sample(Preset("ab4"), sigmas, x)
    gpu = sample(Preset("ab4"), sigmas.cuda(), x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["euler", "ab2", "ab3", "ab4", "ipndm"])
def test_repeated_sigmas_are_no_op_steps_and_multistep_presets_fall_to_the_distinct_ones(preset):
    """A repeated sigma is a zero-length step: nothing moves and the model is not called. Adams-Bashforth counts
    a sigma repeated in its history once, so right after the repeats it falls to the distinct sigmas it has."""
    sigmas = karras_sigmas(6, 0.0292, 14.6146)
    repeated = torch.cat([sigmas[:3], sigmas[2:3], sigmas[2:3], sigmas[3:]])  # sigma_2 three times
    table = Preset(preset).weights(repeated)
    assert torch.isfinite(table).all()
    if preset.startswith("ab"):  # row 4 (sigma_2 -> sigma_3) weighs one derivative per distinct sigma in its window
        window = repeated[5 - table.shape[1] : 5].tolist()
        assert int((table[4] != 0).sum()) == len(set(window)) < table.shape[1]
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * float(sigmas[0])
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    out = sample_consistency_solver(counting, x, repeated, disable=True, coefficients=Preset(preset))
    assert calls == sigmas[:-1].tolist()

    def rmse(result):
        return result.sub(exact_final(x, float(sigmas[0]))).pow(2).mean().sqrt().item()

    if preset == "euler":
        assert torch.equal(out, sample(Preset("euler"), sigmas, x))
    else:  # still more accurate than Euler on the same sigmas
        assert rmse(out) < 0.9 * rmse(sample(Preset("euler"), sigmas, x))


def test_sigmas_ending_in_two_zeros_finish_like_one_zero():
    sigmas = karras_sigmas(6, 0.0292, 14.6146)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * float(sigmas[0])
    for preset in ("euler", "ab4"):
        doubled = sample(Preset(preset), torch.cat([sigmas, sigmas.new_zeros(1)]), x)
        torch.testing.assert_close(doubled, sample(Preset(preset), sigmas, x))


def test_a_table_row_weighing_a_derivative_that_does_not_exist_yet_is_refused_by_the_sampler():
    table = TableCoefficients({2: torch.tensor([[0.5, 0.5], [1.5, -0.5]], dtype=torch.float64)}, order=2)
    with pytest.raises(InvalidWeights, match=r"derivatives that do not exist yet \(row 0: \[0.5, 0.5\], 1 exist"):
        sample(table, torch.tensor([3.0, 1.0, 0.0]), torch.randn(1, 2))


def test_non_finite_sigmas_are_named_in_the_weights_problem():
    with pytest.raises(InvalidWeights, match="the sigmas are not all finite"):
        coefficient_table(Preset("ab2"), torch.tensor([3.0, float("nan"), 0.0]))


def test_to_d_broadcasts_a_per_sample_sigma_over_the_latent():
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(6))
    denoised = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(7))
    sigma = torch.tensor([0.5, 2.0, 8.0])
    expected = torch.stack([(x[b] - denoised[b]) / sigma[b] for b in range(3)])
    torch.testing.assert_close(to_d(x, sigma, denoised), expected)
    torch.testing.assert_close(to_d(x, torch.tensor(2.0), denoised), (x - denoised) / 2.0)
    torch.testing.assert_close(to_d(x, 2.0, denoised), (x - denoised) / 2.0)


def test_one_choice_check_with_one_wording():
    check_choice("preset", "ab2", ("ab2", "ab3"))
    with pytest.raises(UnknownChoice, match=r"^unknown preset 'ab9'; choose one of ab2, ab3$") as error:
        check_choice("preset", "ab9", ("ab2", "ab3"))
    assert (error.value.what, error.value.value, error.value.choices) == ("preset", "ab9", ("ab2", "ab3"))
    with pytest.raises(UnknownChoice, match="unknown preset 'heun'"):
        Preset("heun")


def shaped_policy(steps: int) -> PolicyCoefficients:
    """A policy whose rows are far from Euler's, so a last row of [1, 0, ...] can only come from ``last_step``."""
    policy = ConsistencyPolicy(order=4, bins=11, hidden=16)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(parameter.numel()))
    return PolicyCoefficients(policy, "log_sigma", (steps,))


def test_a_denoised_last_step_returns_the_models_denoised_estimate():
    sigmas = karras_sigmas(6, 0.0292, 14.6146)
    learned = shaped_policy(6)
    denoised = dataclasses.replace(learned, last_step="denoised")
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(8)) * float(sigmas[0])
    learned_table, table = coefficient_table(learned, sigmas), coefficient_table(denoised, sigmas)
    assert table[-1].tolist() == [1.0, 0.0, 0.0, 0.0] and learned_table[-1].tolist() != [1.0, 0.0, 0.0, 0.0]
    assert torch.equal(table[:-1], learned_table[:-1])
    for coefficients, ends_on_denoised in ((denoised, True), (learned, False)):
        seen = []
        out = sample(coefficients, sigmas, x, callback=seen.append)
        # x + (0 - sigma) (x - denoised) / sigma: the denoised estimate up to float32 rounding of x.
        assert torch.allclose(out, seen[-1]["denoised"], rtol=0, atol=1e-6) == ends_on_denoised


def test_only_the_step_to_sigma_zero_is_set_to_the_denoised_estimate():
    sigmas = karras_sigmas(6, 0.0292, 14.6146)
    denoised = dataclasses.replace(shaped_policy(6), last_step="denoised")
    partial = sigmas.clone()
    partial[-1] = 0.01  # a run that stops short of sigma 0 (a first pass of a two-pass workflow)
    learned = dataclasses.replace(denoised, last_step="learned")
    assert torch.equal(denoised.weights(partial), learned.weights(partial))
    # With sigmas ending in 0, 0 the row to 0 is the second to last; the zero-length step after it moves nothing.
    doubled = dataclasses.replace(denoised, trained_steps=(7,))
    table = doubled.weights(torch.cat([sigmas, sigmas.new_zeros(1)]))
    assert table[-2].tolist() == [1.0, 0.0, 0.0, 0.0] and table[-1].tolist() != [1.0, 0.0, 0.0, 0.0]
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(9)) * float(sigmas[0])
    seen = []
    out = sample(doubled, torch.cat([sigmas, sigmas.new_zeros(1)]), x, callback=seen.append)
    torch.testing.assert_close(out, seen[-1]["denoised"], rtol=0, atol=1e-6)


def test_an_unknown_last_step_is_refused_naming_the_choices():
    with pytest.raises(UnknownChoice, match="unknown last step 'euler'; choose one of learned, denoised"):
        dataclasses.replace(shaped_policy(6), last_step="euler")
