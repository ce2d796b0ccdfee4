"""The trainer: PPO loss and masking, rollouts, determinism and resume, learning, the CLI's file and report."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from consistency_solver.solver import (
    ConsistencyPolicy,
    Preset,
    TableCoefficients,
    actions_to_weights,
    active_action_mask,
    load_coefficients,
    sample_consistency_solver,
    save_coefficients,
)
from consistency_solver.solver.coefficients import history_lengths
from consistency_solver.training.testbeds import get_testbed
from consistency_solver.training.trainer.cli import main
from consistency_solver.training.trainer.data import ReferenceSettings, bed_problem
from consistency_solver.training.trainer.loop import (
    Problem,
    TrainConfig,
    build_policy,
    clip_gradients,
    coefficients,
    held_out_rmse,
    learning_rate,
    new_state,
    plan_update,
    train,
)
from consistency_solver.training.trainer.ppo import (
    PPOSettings,
    clipped_loss,
    group_advantages,
    log_probs_and_entropy,
)
from consistency_solver.training.trainer.rewards import make_reward
from consistency_solver.training.trainer.rollout import (
    active_actions,
    expected_weights,
    indices_to_weights,
    sample_action_indices,
    step_features,
    unroll,
)
from consistency_solver.training.trainer.schedule import LearnedSchedule

BED = "gmm-vector-eps"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    settings = ReferenceSettings(train_count=64, held_out_count=64, cache_dir=str(tmp_path_factory.mktemp("refs")))
    return bed_problem(BED, make_reward("rmse"), settings)


def test_ppo_loss_matches_hand_computed_example():
    # Two steps, one free coefficient (order 2), two bins. Step 0 has one derivative: nothing active.
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]]])  # step 1: p = (0.25, 0.75)
    indices = torch.tensor([[[0], [1]], [[0], [0]]])  # rollout 0 picks p=0.75 at step 1, rollout 1 p=0.25
    active = active_action_mask(history_lengths(2, 2), 2)
    assert active.tolist() == [[False], [True]]
    new_log_probs, entropy = log_probs_and_entropy(logits, indices, active)
    assert new_log_probs[:, 1].exp().tolist() == pytest.approx([0.75, 0.25])
    old_log_probs = torch.full((2, 2), math.log(0.5))  # sampled from a uniform policy
    advantages = torch.tensor([1.0, -1.0])
    loss = clipped_loss(new_log_probs, old_log_probs, advantages, entropy, active, clip=0.2, entropy_coef=0.01)
    # ratios 1.5 and 0.5 -> clipped surrogates min(1.5, 1.2) = 1.2 and min(-0.5, -0.8) = -0.8; mean 0.2.
    normalised_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert float(loss) == pytest.approx(-0.2 - 0.01 * normalised_entropy, abs=1e-6)


def test_inactive_dimensions_change_neither_log_probs_nor_entropy_term():
    torch.manual_seed(0)
    steps, order, bins = 4, 4, 5
    logits = torch.randn(steps, order - 1, bins)
    indices = torch.randint(bins, (3, steps, order - 1))
    active = active_action_mask(history_lengths(steps, order), order)
    assert active.sum(dim=1).tolist() == [0, 1, 2, 3]
    changed_logits, changed_indices = logits.clone(), indices.clone()
    changed_logits[~active] = torch.randn(int((~active).sum()), bins) * 10
    changed_indices[:, ~active] = (changed_indices[:, ~active] + 1) % bins
    reference = log_probs_and_entropy(logits, indices, active)
    changed = log_probs_and_entropy(changed_logits, changed_indices, active)
    assert torch.allclose(reference[0], changed[0])
    assert torch.allclose(reference[1][active], changed[1][active])
    advantages = torch.tensor([1.0, 0.0, -1.0])
    losses = [
        clipped_loss(lp, lp.detach() - 0.1, advantages, ent, active, 0.2, 0.01) for lp, ent in (reference, changed)
    ]
    assert float(losses[0]) == pytest.approx(float(losses[1]))
    # ... and the inactive dimensions do not change the weights either.
    sigmas = torch.linspace(1, 0, steps + 1)
    assert torch.equal(
        indices_to_weights(ConsistencyPolicy(order, bins), indices, sigmas, "learned"),
        indices_to_weights(ConsistencyPolicy(order, bins), changed_indices, sigmas, "learned"),
    )


def test_group_advantages_floor_the_std():
    spread = group_advantages(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), std_floor=1e-3)
    assert spread.mean().abs() < 1e-12 and spread.std(unbiased=False) == pytest.approx(1.0)
    # Near-identical rewards (a sharpened policy) must not be blown up to unit-variance advantages.
    nearly = group_advantages(torch.tensor([1.0, 1.0 + 1e-7], dtype=torch.float64), std_floor=1e-3)
    assert nearly.abs().max() < 1e-3


def test_sampled_actions_follow_the_policy_and_are_seeded():
    logits = torch.tensor([[[0.0, math.log(3.0)]]]).expand(2, 1, 2)
    draws = sample_action_indices(logits, 4000, torch.Generator().manual_seed(1))
    assert draws.shape == (4000, 2, 1)
    assert draws.float().mean() == pytest.approx(0.75, abs=0.03)
    assert torch.equal(draws, sample_action_indices(logits, 4000, torch.Generator().manual_seed(1)))


def test_unroll_is_the_inference_sampler_and_takes_per_sample_weights(problem):
    sigmas = problem.bed.sigmas(6)
    noise, labels, _ = problem.train.take(torch.arange(4))
    x = problem.bed.initial_state(noise, sigmas)
    model = problem.bed.model(labels)
    table = Preset("ab3").weights(sigmas)
    expected = sample_consistency_solver(model, x, sigmas, disable=True, coefficients=Preset("ab3"))
    assert torch.allclose(unroll(model, x, sigmas, table), expected, atol=1e-5)
    per_sample = torch.stack([Preset("euler").weights(sigmas).expand(-1, 3).contiguous(), *[table] * 3]).float()
    per_sample[0, :, 1:] = 0
    mixed = unroll(model, x, sigmas, per_sample)
    euler = sample_consistency_solver(model, x[:1], sigmas, disable=True, coefficients=Preset("euler"))
    assert torch.allclose(mixed[:1], euler, atol=1e-5) and torch.allclose(mixed[1:], expected[1:], atol=1e-5)


def test_indices_to_weights_apply_the_paper_rule():
    policy = ConsistencyPolicy(order=4, bins=5)
    indices = torch.randint(5, (2, 6, 3), generator=torch.Generator().manual_seed(0))
    actions = policy.action_values.expand(2, 6, 3, 5).gather(-1, indices.unsqueeze(-1)).squeeze(-1).double()
    expected = actions_to_weights(actions.reshape(12, 3), history_lengths(6, 4).repeat(2)).reshape(2, 6, 4)
    assert torch.allclose(indices_to_weights(policy, indices, torch.linspace(1, 0, 7), "learned"), expected)


def test_a_denoised_last_step_is_the_row_1_0_0_0_whose_actions_change_nothing():
    policy, steps = build_policy(TrainConfig(bins=5)), 6
    with torch.no_grad():
        policy.mlp[4].bias.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1, 0, steps + 1)
    features = step_features(sigmas, "log_sigma")
    indices = torch.randint(5, (3, steps, 3), generator=torch.Generator().manual_seed(1))
    learned = indices_to_weights(policy, indices, sigmas, "learned")
    denoised = indices_to_weights(policy, indices, sigmas, "denoised")
    assert (denoised[:, -1] == torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=denoised.dtype)).all()
    assert torch.equal(denoised[:, :-1], learned[:, :-1]) and not torch.equal(denoised[:, -1], learned[:, -1])
    # PPO: the last step's actions enter neither the log-probabilities nor the decisions of the clipped loss.
    active = active_actions(policy.order, sigmas, "denoised")
    assert not active[-1].any() and torch.equal(active[:-1], active_actions(policy.order, sigmas, "learned")[:-1])
    changed = indices.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 5
    logits = policy(features)
    assert torch.equal(
        log_probs_and_entropy(logits, indices, active)[0], log_probs_and_entropy(logits, changed, active)[0]
    )
    assert torch.equal(indices_to_weights(policy, changed, sigmas, "denoised"), denoised)
    # The direct mode: the last row carries no gradient, the others do.
    expected = expected_weights(policy, features, sigmas, "denoised")
    assert expected[-1].tolist() == [1.0, 0.0, 0.0, 0.0]
    (last,) = torch.autograd.grad(expected[-1].sum(), policy.mlp[4].bias, allow_unused=True, materialize_grads=True)
    assert not last.any() and expected[:-1].requires_grad
    # A run that stops short of sigma 0 keeps every row the policy gives.
    partial = torch.linspace(1, 0.1, steps + 1)
    assert torch.equal(indices_to_weights(policy, indices, partial, "denoised"), learned)


@pytest.mark.parametrize(
    ("mode", "form", "schedule"),
    [("ppo", "policy", "given"), ("direct", "policy", "given"), ("direct", "table", "learned")],
)
def test_resume_gives_the_same_result_as_an_uninterrupted_run(problem, tmp_path, mode, form, schedule):
    config = TrainConfig(
        mode=mode,
        steps=(4, 5, 6),
        updates=4,
        groups=2,
        batch=4,
        ppo=PPOSettings(rollouts=4, epochs=2),
        form=form,
        schedule=schedule,
        lr_schedule="cosine" if form == "table" else "constant",
        row_sums="free" if form == "table" else "one",  # the table case is the bundled files' configuration
    )
    uninterrupted = train(config, [problem], progress=False)
    checkpoint = tmp_path / "run.ckpt"
    train(config, [problem], checkpoint=checkpoint, progress=False, stop_after=2)
    resumed = train(config, [problem], checkpoint=checkpoint, resume=True, progress=False)
    assert resumed.update == uninterrupted.update == 4
    assert resumed.evaluations == uninterrupted.evaluations
    for name, tensor in uninterrupted.policy.state_dict().items():
        assert torch.equal(tensor, resumed.policy.state_dict()[name]), name
    if schedule == "learned":
        for name, tensor in uninterrupted.schedule.state_dict().items():
            assert torch.equal(tensor, resumed.schedule.state_dict()[name]), name
    assert [h["reward"] for h in resumed.history] == [h["reward"] for h in uninterrupted.history]


def test_resume_refuses_a_different_configuration(problem, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    config = TrainConfig(mode="direct", steps=(4,), updates=1, batch=2)
    train(config, [problem], checkpoint=checkpoint, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        train(TrainConfig(mode="direct", steps=(5,), updates=2, batch=2), [problem], checkpoint=checkpoint, resume=True)


@pytest.mark.parametrize(
    ("mode", "updates", "lr"),
    [("ppo", 40, 3e-3), ("direct", 15, 3e-3)],
)
def test_a_short_run_improves_held_out_consistency(problem, mode, updates, lr):
    config = TrainConfig(
        mode=mode, steps=(4,), updates=updates, lr=lr, groups=4, batch=16, ppo=PPOSettings(rollouts=16)
    )
    state = train(config, [problem], progress=False)
    initial = held_out_rmse(coefficients(ConsistencyPolicy(4, 21), config), problem, 4)
    trained = held_out_rmse(coefficients(state.policy, config), problem, 4)
    assert trained < 0.9 * initial
    rewards = [h["reward"] for h in state.history]
    quarter = max(len(rewards) // 4, 1)
    assert sum(rewards[-quarter:]) / quarter > sum(rewards[:quarter]) / quarter


def test_cli_writes_a_coefficient_file_with_full_metadata_and_a_report(tmp_path):
    output = tmp_path / "policy.safetensors"
    argv = [
        "--bed", BED, "--mode", "direct", "--steps", "4-5", "--updates", "2", "--batch", "2",
        "--train-count", "8", "--held-out-count", "8", "--references-dir", str(tmp_path / "refs"),
        "--output", str(output), "--seed", "3", "--no-progress",
    ]  # fmt: skip
    main(argv)
    loaded = load_coefficients(output)
    assert loaded.mode == "expectation" and loaded.trained_steps == (4, 5) and loaded.time_features == "log_sigma"
    metadata = loaded.metadata
    assert metadata["model_family"] == "gmm-eps"
    training = json.loads(metadata["training"])
    assert training["seed"] == 3 and training["mode"] == "direct" and "--updates 2" in training["command"]
    assert training["model_evaluations"] == 2 * 2 * (4 + 5) * 3  # forward plus backward (2 per call)
    assert set(training["held_out_rmse"]) == {"5"}
    report = json.loads((tmp_path / "policy" / "report.json").read_text())
    assert set(report["held_out_rmse"][BED]) >= {"trained", "initial policy", "ab4", "ipndm", report["dpmpp_2m"]}
    assert (tmp_path / "policy" / "report.png").stat().st_size > 0
    with pytest.raises(ValueError, match="trained for 4-5 steps"):
        sample_consistency_solver(
            lambda x, s: x * 0, torch.ones(1, 2), torch.linspace(1, 0, 7), disable=True, coefficients=loaded
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "ppo", "schedule": "learned"}, "use --mode direct with --schedule learned"),
        ({"mode": "ppo", "form": "table"}, "use --mode direct with --form table"),
        ({"schedule": "karras"}, "unknown schedule"),
        ({"form": "mlp"}, "unknown form"),
        ({"mode": "direct", "row_sums": "free"}, "use --form table with --row-sums free"),
        ({"mode": "direct", "form": "table", "row_sums": "loose"}, "unknown row sums"),
        ({"mode": "direct", "form": "table", "last_step": "denoised"}, "use --form policy with --last-step denoised"),
        ({"last_step": "euler"}, "unknown last step 'euler'; choose one of learned, denoised"),
    ],
)
def test_config_refuses_combinations_that_cannot_train(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


@pytest.mark.parametrize("mode", ["ppo", "direct"])
def test_the_last_step_option_reaches_the_file(tmp_path, mode):
    output = tmp_path / "denoised.safetensors"
    argv = [
        "--bed", BED, "--mode", mode, "--steps", "4", "--updates", "1", "--batch", "2", "--groups", "2",
        "--train-count", "8", "--held-out-count", "8", "--references-dir", str(tmp_path / "refs"),
        "--output", str(output), "--no-progress", "--last-step", "denoised",
    ]  # fmt: skip
    main(argv)
    loaded = load_coefficients(output)
    assert loaded.last_step == "denoised" and loaded.metadata["last_step"] == "denoised"
    assert "--last-step denoised" in json.loads(loaded.metadata["training"])["command"]
    assert loaded.weights(get_testbed(BED).sigmas(4))[-1].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_cli_names_the_fix_for_ppo_with_a_learned_schedule(tmp_path, capsys):
    argv = ["--bed", BED, "--mode", "ppo", "--schedule", "learned", "--output", str(tmp_path / "x.safetensors")]
    with pytest.raises(SystemExit):
        main(argv)
    said = capsys.readouterr().err
    assert (
        "error: a learned schedule needs the gradient" in said and "use --mode direct with --schedule learned" in said
    )


@pytest.mark.parametrize("bed", ["gmm-vector-eps", "gmm-vector-flow"])
def test_learned_schedule_starts_at_the_beds_default(bed):
    testbed = get_testbed(bed)
    schedule = LearnedSchedule.from_default(testbed, (4, 7))
    for steps in (4, 7):
        expected = testbed.sigmas(steps)
        learned = schedule.sigmas(steps, testbed).detach()
        assert learned[0] == pytest.approx(float(expected[0]), rel=1e-6) and learned[-1] == 0
        # karras ends at sigma_min, where the slack share starts at 1e-3 of the log range: a tiny offset.
        assert torch.allclose(learned, expected, rtol=1e-2, atol=0)


def test_table_and_learned_schedule_improve_held_out_consistency_and_export_both(tmp_path):
    settings = ReferenceSettings(train_count=64, held_out_count=64, cache_dir=str(tmp_path / "refs"))
    problem = bed_problem("gmm-image-eps", make_reward("rmse"), settings)
    config = TrainConfig(mode="direct", form="table", schedule="learned", steps=(4,), updates=30, lr=1e-2, batch=16)
    state = train(config, [problem], progress=False)
    trained = coefficients(state.policy, config, state.schedule)
    initial = held_out_rmse(Preset("euler"), problem, 4)  # a zero table on the default schedule is Euler
    assert held_out_rmse(trained, problem, 4) < 0.9 * initial
    learned = trained.schedule.sigmas(4, problem.bed.sigma_min, problem.bed.sigma_max)
    assert not torch.allclose(learned, problem.bed.sigmas(4), rtol=1e-2)  # the schedule moved
    path = tmp_path / "table.safetensors"
    save_coefficients(path, trained, model_family="gmm-eps")
    loaded = load_coefficients(path)
    assert isinstance(loaded, TableCoefficients) and torch.equal(loaded.tables[4], trained.tables[4])
    assert torch.equal(loaded.schedule.sigmas(4, 0.03, 14.6), trained.schedule.sigmas(4, 0.03, 14.6))
    assert held_out_rmse(loaded, problem, 4) == pytest.approx(held_out_rmse(trained, problem, 4), rel=1e-6)


def test_free_row_sums_start_at_one_and_learn_step_scales_that_beat_the_consistent_table(tmp_path):
    settings = ReferenceSettings(train_count=256, held_out_count=128, cache_dir=str(tmp_path / "refs"))
    problem = bed_problem("gmm-vector-eps-cfg", make_reward("rmse"), settings)
    results = {}
    for row_sums in ("one", "free"):
        config = TrainConfig(
            mode="direct", form="table", row_sums=row_sums, steps=(5,), updates=60, lr=1e-2, batch=128, seed=1
        )
        euler = torch.zeros(5, 4)
        euler[:, 0] = 1
        assert torch.equal(build_policy(config).weights(5).detach(), euler)  # zero actions and scales: Euler
        trained = coefficients(train(config, [problem], progress=False).policy, config)
        assert trained.row_sums == row_sums
        results[row_sums] = (trained, held_out_rmse(trained, problem, 5))
    sums = results["free"][0].tables[5].sum(dim=1)
    assert not torch.allclose(sums, torch.ones(5, dtype=sums.dtype), atol=1e-3)  # the scales moved
    assert results["free"][1] < 0.9 * results["one"][1]


def test_a_tables_step_counts_are_clipped_apart_and_a_policy_as_a_whole(tmp_path):
    settings = ReferenceSettings(train_count=4, held_out_count=4, cache_dir=str(tmp_path / "refs"))
    problem = bed_problem("gmm-vector-eps", make_reward("rmse"), settings)
    config = TrainConfig(mode="direct", form="table", row_sums="free", schedule="learned", steps=(4, 8), grad_clip=1.0)
    state = new_state(config, [problem])
    for parameter in state.policy.step_parameters(4):
        parameter.grad = torch.full_like(parameter, 100.0)
    small = [torch.full_like(p, 1e-3) for p in state.policy.step_parameters(8)]
    for parameter, gradient in zip(state.policy.step_parameters(8), small, strict=True):
        parameter.grad = gradient.clone()
    for parameter in state.schedule.parameters():
        parameter.grad = torch.zeros_like(parameter)
    clip_gradients(state, config)
    four = torch.cat([p.grad.flatten() for p in state.policy.step_parameters(4)])
    assert float(four.norm()) == pytest.approx(0.5, rel=1e-4)  # its share of the norm: grad_clip / 2 step counts
    for parameter, gradient in zip(state.policy.step_parameters(8), small, strict=True):
        assert torch.equal(parameter.grad, gradient)  # untouched by the 4-step spike

    policy_config = TrainConfig(mode="direct", steps=(4, 8), grad_clip=1.0)
    policy_state = new_state(policy_config, [problem])
    for parameter in policy_state.policy.parameters():
        parameter.grad = torch.full_like(parameter, 100.0)
    clip_gradients(policy_state, policy_config)
    total = torch.cat([p.grad.flatten() for p in policy_state.policy.parameters()]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-4)


def test_cosine_learning_rate_decays_to_zero():
    config = TrainConfig(mode="direct", updates=10, lr=0.1, lr_schedule="cosine")
    assert [learning_rate(config, u) for u in (0, 5)] == pytest.approx([0.1, 0.05])
    assert learning_rate(config, 9) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert learning_rate(TrainConfig(lr=0.1, updates=10), 9) == 0.1


def test_a_mixture_in_a_mix_of_beds_trains_on_its_own_batch(problem):
    fashion_like = Problem(object(), problem.train, problem.held_out, problem.reward)  # any bed that is no mixture
    config = TrainConfig(mode="direct", steps=tuple(range(4, 13)), batch=2, mixture_batch=8)
    plans = plan_update(config, [problem, fashion_like], update=0)
    assert {(plan.problem, len(plan.samples)) for plan in plans} == {(0, 8), (1, 2)}
    plain = plan_update(dataclasses.replace(config, mixture_batch=0), [problem, fashion_like], update=0)
    assert {len(plan.samples) for plan in plain} == {2}


def test_the_mixture_share_sets_how_many_batches_come_from_the_mixtures_of_a_mix(problem):
    learned = Problem(object(), problem.train, problem.held_out, problem.reward)  # any bed that is no mixture
    problems = [problem, problem, problem, learned]  # three mixtures crowd out one learned bed, drawn alike
    config = TrainConfig(mode="direct", steps=tuple(range(4, 13)), batch=2, mixture_share=0.25)

    def learned_share(config):
        plans = [plan for update in range(40) for plan in plan_update(config, problems, update)]
        return sum(plan.problem == 3 for plan in plans) / len(plans)

    assert 0.65 < learned_share(config) < 0.85
    assert 0.15 < learned_share(dataclasses.replace(config, mixture_share=0.0)) < 0.35
    only_mixtures = plan_update(config, [problem, problem], update=0)  # no other bed: the share does not apply
    assert {plan.problem for plan in only_mixtures} == {0, 1}
