"""The trainer's ComfyUI backend on the tiny in-Python ComfyUI model (skipped without ComfyUI)."""

from __future__ import annotations

import pytest
import torch
from fixtures.comfyui import require_comfyui

require_comfyui()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from fixtures import tiny_models  # noqa: E402

from consistency_solver.solver import Preset, sample_consistency_solver  # noqa: E402
from consistency_solver.training.trainer.cli import main  # noqa: E402
from consistency_solver.training.trainer.comfy_model import ComfyModel  # noqa: E402
from consistency_solver.training.trainer.data import ReferenceSettings, reference_set  # noqa: E402
from consistency_solver.training.trainer.loop import Problem, TrainConfig, coefficients, held_out_rmse, train  # noqa: E402
from consistency_solver.training.trainer.ppo import PPOSettings  # noqa: E402
from consistency_solver.training.trainer.rewards import make_reward  # noqa: E402
from consistency_solver.training.trainer.schedule import LearnedSchedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str) -> ComfyModel:
    patcher = tiny_models.tiny_unet_model(kind, seed=0)
    prompts = [tiny_models.random_conditioning(seed) for seed in (1, 2)]
    return ComfyModel(
        patcher,
        prompts,
        tiny_models.random_conditioning(3),
        cfg=3.0,
        scheduler="karras" if kind == "eps" else "simple",
        width=64,
        height=64,
        name="tiny",
    )


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_the_backend_denoiser_is_comfyuis_guided_model(kind):
    """Sampling through the backend equals ComfyUI's own sample_custom with the pack's sampler, same noise."""
    model = tiny(kind)
    assert model.model_family == f"tiny-{kind}" and model.shape == (4, 8, 8)
    sigmas = model.sigmas(5)
    noise = model.noise(2, torch.Generator().manual_seed(0))
    ours = sample_consistency_solver(
        model.model(torch.tensor([1, 1])),
        model.initial_state(noise, sigmas),
        sigmas,
        disable=True,
        coefficients=Preset("ab2"),
    )
    sampler = comfy.samplers.KSAMPLER(sample_consistency_solver, extra_options={"coefficients": Preset("ab2")})
    latent = torch.zeros(2, 4, 8, 8)
    theirs = comfy.sample.sample_custom(
        model.patcher, noise, 3.0, sampler, sigmas.float(), model.positives[1], model.negative, latent
    )
    theirs = model.patcher.model.process_latent_in(theirs)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def tiny_problem(cache_dir) -> Problem:
    """The tiny EPS model with 4 training and 2 held-out noises, references 12 steps deep."""
    model = tiny("eps")
    settings = ReferenceSettings(steps=12, train_count=4, held_out_count=2, cache_dir=str(cache_dir))
    return Problem(
        bed=model,
        train=reference_set(model, list(range(4)), settings),
        held_out=reference_set(model, [10_000, 10_001], settings),
        reward=make_reward("rmse"),
    )


@pytest.mark.parametrize("mode", ["ppo", "direct"])
def test_training_runs_on_the_tiny_comfyui_model(tmp_path, mode):
    problem = tiny_problem(tmp_path)
    config = TrainConfig(
        mode=mode, steps=(3,), updates=2, groups=2, batch=2, eval_steps=(3,), ppo=PPOSettings(rollouts=3, epochs=2)
    )
    state = train(config, [problem], progress=False)
    assert state.update == 2 and all(torch.isfinite(torch.tensor(h["reward"])) for h in state.history)
    assert state.policy.mlp[4].weight.abs().sum() > 0  # the policy moved: gradients flowed through ComfyUI
    assert held_out_rmse(coefficients(state.policy, config), problem, 3) > 0


def test_a_schedule_learns_through_the_tiny_comfyui_model(tmp_path):
    problem = tiny_problem(tmp_path)
    model = problem.bed
    config = TrainConfig(mode="direct", schedule="learned", steps=(3,), updates=2, batch=2, eval_steps=(3,))
    state = train(config, [problem], progress=False)
    initial = LearnedSchedule.from_default(model, (3,))
    assert not torch.equal(state.schedule.logits["N3"], initial.logits["N3"])  # sigma gradients flowed
    trained = coefficients(state.policy, config, state.schedule)
    sigmas = trained.schedule.sigmas(3, model.sigma_min, model.sigma_max)
    assert sigmas[0] == pytest.approx(float(model.model_sampling.sigma_max)) and sigmas[-1] == 0
    assert held_out_rmse(trained, problem, 3) > 0


def test_an_unknown_checkpoint_or_scheduler_is_refused_before_any_model_is_loaded(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    run = ["--comfy-checkpoint", str(tmp_path / "absent.safetensors"), "--prompts", str(prompts),
           "--output", str(tmp_path / "out.safetensors"), "--updates", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as raised:
        main(run)
    assert str(raised.value.code).startswith("error: give --comfy-checkpoint a checkpoint file, or the name of one in")
    assert "absent.safetensors is neither" in str(raised.value.code)

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not loaded: the scheduler is checked first")
    run[1] = str(checkpoint)
    with pytest.raises(SystemExit) as raised:
        main([*run, "--scheduler", "kerras"])
    assert str(raised.value.code).startswith("error: set --scheduler to one of ComfyUI's schedulers (simple")
    assert str(raised.value.code).endswith("not kerras")
