"""The Consistency Solver Calibrate node in-process on tiny ComfyUI models: its file and report, its key (the model,
not the prompt), cancel, budget, every refine sampler, and ``auto`` picking the file made for the running model."""

import json

import pytest
import torch
from fixtures.comfyui import require_comfyui

require_comfyui()

import comfy.model_management  # noqa: E402
import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402
from comfy_extras import nodes_custom_sampler  # noqa: E402
from fixtures import tiny_models  # noqa: E402
from safetensors import safe_open  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's nodes.py, loaded by require_comfyui)
from consistency_solver.calibration import CALIBRATOR_REVISION  # noqa: E402
from consistency_solver.nodes import calibrate as calibrate_node  # noqa: E402
from consistency_solver.nodes import register  # noqa: E402
from consistency_solver.nodes.calibrate import ConsistencySolverCalibrate  # noqa: E402
from consistency_solver.nodes.definitions import (  # noqa: E402
    ConsistencySolverCoefficients,
    DiffusionPreview,
    SamplerConsistencySolver,
)
from consistency_solver.solver import load_coefficients  # noqa: E402
from consistency_solver.solver.defaults import BUNDLED_DIR  # noqa: E402

torch.set_num_threads(1)
register()
POSITIVE, NEGATIVE = tiny_models.random_conditioning(1), tiny_models.random_conditioning(2)
LATENT = {"samples": torch.zeros(2, 4, 8, 8)}
REFINE_STEPS, STEPS, BUDGET = 8, "3,4", 700


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    paths = folder_paths.folder_names_and_paths["consistency_solver"]
    folder = tmp_path / "consistency_solver"
    folder.mkdir()
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "consistency_solver", ([str(folder), str(BUNDLED_DIR)], paths[1])
    )
    return folder


def counted(model, interrupt_after=None):
    """The model with every guided model call (one per latent) counted; optionally Cancel after some."""
    model = model.clone()
    calls = {"count": 0, "largest": 0}

    def wrapper(apply_model, arguments):
        latents = arguments["input"].shape[0] // len(arguments["cond_or_uncond"])
        calls["count"] += latents
        calls["largest"] = max(calls["largest"], latents)
        if interrupt_after is not None and calls["count"] >= interrupt_after:
            comfy.model_management.interrupt_current_processing(True)
        return apply_model(arguments["input"], arguments["timestep"], **arguments["c"])

    model.set_model_unet_function_wrapper(wrapper)
    return model, calls


def calibrate(model, positive=POSITIVE, sampler="dpmpp_2m", budget=BUDGET, name="auto", per_prompt=False, **extra):
    output = ConsistencySolverCalibrate().calibrate(
        model, positive, NEGATIVE, LATENT, 4.0, STEPS, sampler, "simple", REFINE_STEPS, budget, name, per_prompt,
        **extra,
    )  # fmt: skip
    selection, report = output["result"]
    assert output["ui"]["text"] == [report]
    return selection, report


def training_of(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["model_family"], json.loads(handle.metadata()["training"])


def test_the_node_writes_its_file_and_report_and_a_prompt_edit_makes_no_model_call(models_dir):
    model, calls = counted(tiny_models.tiny_unet_model("eps"))
    selection, report = calibrate(model)
    path = models_dir / selection.choice
    assert selection.choice.startswith("calibrated-") and path.is_file()
    first = calls["count"]
    assert 0 < first <= BUDGET and calls["largest"] <= LATENT["samples"].shape[0]
    family, training = training_of(path)
    assert family == "calibrated-eps" and training["model_calls"] == first
    assert training["settings"]["refine_sampler"] == "dpmpp_2m" and training["settings"]["steps"] == [3, 4]
    assert set(training["winners"]) == {"3", "4"} and training["noises"]["held_out"] >= 4
    assert "dpmpp_2m / karras" in training["validation"]["4"]  # the stock samplers raced the fit
    assert report.startswith("Judged on") and "x best stock" in report and "dpmpp_2m/simple at 8 steps" in report
    coefficients = load_coefficients(path)
    assert sorted(coefficients.tables) == [3, 4] and sorted(coefficients.schedule.positions) == [3, 4]

    edited = tiny_models.random_conditioning(9)
    again, again_report = calibrate(model, positive=edited)
    assert again == selection and again_report == report and calls["count"] == first  # zero model calls
    latent, _ = DiffusionPreview().preview(
        model, edited, NEGATIVE, LATENT, 7, 4, 4.0, "consistency_solver", 1.0, "auto", loaded_coefficients=selection
    )
    assert torch.isfinite(latent["samples"]).all()


def test_a_lora_another_checkpoint_or_per_prompt_calibration_calibrates_again(models_dir):
    model, calls = counted(tiny_models.gaussian_model("eps"))

    def spent(function, *args, **kwargs):
        before = calls["count"]
        result = function(*args, **kwargs)
        return result, calls["count"] - before

    (selection, _), first = spent(calibrate, model)
    assert first > 0
    patched = model.clone()
    key = "diffusion_model.anchor"  # the Gaussian model's one parameter
    patched.add_patches({key: (torch.ones_like(patched.model.state_dict()[key]),)}, 0.01)  # a "LoRA"
    (with_lora, _), lora_calls = spent(calibrate, patched)
    assert lora_calls > 0 and with_lora != selection
    other, other_calls = counted(tiny_models.gaussian_model("eps", mean=0.5))
    assert calibrate(other)[0] not in (selection, with_lora) and other_calls["count"] > 0
    assert spent(calibrate, model)[1] == 0  # the first model's own file is still there, and its key

    (per_prompt, _), once = spent(calibrate, model, per_prompt=True)
    assert once > 0 and per_prompt != selection
    assert spent(calibrate, model, positive=tiny_models.random_conditioning(9), per_prompt=True)[1] > 0
    assert spent(calibrate, model, per_prompt=True)[1] == 0  # back to the first prompt: its own file


def test_a_file_made_by_an_older_calibrator_is_fitted_again(models_dir, monkeypatch):
    model, calls = counted(tiny_models.gaussian_model("eps"))
    calibrate(model)
    first = calls["count"]
    monkeypatch.setattr(calibrate_node, "CALIBRATOR_REVISION", CALIBRATOR_REVISION + 1)
    calibrate(model)
    assert calls["count"] == 2 * first  # fitted again with the same calls, not loaded


def test_several_prompts_share_the_noises(models_dir):
    model, calls = counted(tiny_models.tiny_unet_model("eps"))
    selection, _ = calibrate(model, positive_2=tiny_models.random_conditioning(3))
    _, training = training_of(models_dir / selection.choice)
    assert calls["count"] == training["model_calls"] <= BUDGET
    one, _ = calibrate(model, name="one prompt")
    assert training_of(models_dir / one.choice)[1]["validation"] != training["validation"]


def test_the_budget_sets_the_noises_and_a_budget_below_the_minimum_is_refused_before_any_call(models_dir):
    model, calls = counted(tiny_models.gaussian_model("eps"))
    small, _ = calibrate(model, budget=BUDGET, name="small")
    large, _ = calibrate(model, budget=2 * BUDGET, name="large")
    noises = [training_of(models_dir / s.choice)[1]["noises"] for s in (small, large)]
    assert noises[0]["fit"] + noises[0]["held_out"] < noises[1]["fit"] + noises[1]["held_out"]
    before = calls["count"]
    with pytest.raises(ValueError, match="^Raise the budget of Consistency Solver Calibrate to at least"):
        calibrate(model, budget=50, name="tiny")
    assert calls["count"] == before and not (models_dir / "tiny.safetensors").exists()


def test_cancel_stops_the_calibration_and_leaves_no_file(models_dir):
    model, calls = counted(tiny_models.tiny_unet_model("eps"), interrupt_after=50)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            calibrate(model)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert calls["count"] <= 52  # stopped at the next call
    assert not any(models_dir.glob("*"))  # neither the file nor a partial one


# Samplers that read the model's sampling type (flow models get their own ancestral steps) or call it unusually,
# tried on flow and V-prediction models too.
FAMILY_SENSITIVE = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "er_sde", "lcm",
                    "sa_solver", "uni_pc", "heun", "seeds_2")  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "sampler"),
    [("eps", name) for name in comfy.samplers.KSampler.SAMPLERS]
    + [(kind, name) for kind in ("flow", "v") for name in FAMILY_SENSITIVE],
)
def test_every_refine_sampler_gives_a_file_or_says_what_to_change(models_dir, kind, sampler):
    """Every name of KSampler's list: a file, or a ValueError that starts with what to change; never a traceback
    from inside a sampler. Stochastic samplers are fitted to their noise-free counterpart, saying so."""
    model, calls = counted(tiny_models.gaussian_model(kind))
    try:
        selection, report = calibrate(model, sampler=sampler, budget=600, name=f"{kind}-{sampler}")
    except ValueError as error:
        assert str(error).startswith(("Pick a refine sampler", "Pick another refine sampler")), error
        assert calls["count"] == 0
        assert sampler in ("dpm_fast", "dpm_adaptive", "consistency_solver")
        return
    assert sampler not in ("dpm_fast", "dpm_adaptive")
    _, training = training_of(models_dir / selection.choice)
    assert training["model_calls"] == calls["count"] <= 600
    assert sampler in training["target"]
    if "ancestral" in sampler or "sde" in sampler:
        assert "noise-free counterpart" in report and "noise-free counterpart" in training["target"]


def test_auto_everywhere_uses_the_file_calibrated_for_the_running_model(models_dir):
    model = tiny_models.tiny_unet_model("eps")
    selection, _ = calibrate(model)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def by_name(patcher):
        return nodes.KSampler().sample(patcher, 3, 4, 4.0, "consistency_solver", "karras", POSITIVE, NEGATIVE,
                                       latent)[0]["samples"]  # fmt: skip

    def wired(patcher, choice):
        sampler = SamplerConsistencySolver().get_sampler(choice, "as stored in the file", False)[0]
        sigmas = nodes_custom_sampler.BasicScheduler().get_sigmas(patcher, "karras", 4, 1.0)[0]
        return nodes_custom_sampler.SamplerCustom().sample(patcher, True, 3, 4.0, POSITIVE, NEGATIVE, sampler,
                                                           sigmas, latent)[0]["samples"]  # fmt: skip

    torch.testing.assert_close(by_name(model), wired(model, selection.choice), rtol=0, atol=0)
    assert not torch.equal(by_name(model), wired(model, "default-eps.safetensors"))
    other = tiny_models.tiny_unet_model("eps", seed=1)  # another checkpoint: its own calibration or the default
    torch.testing.assert_close(by_name(other), wired(other, "default-eps.safetensors"), rtol=0, atol=0)
    shown = ConsistencySolverCoefficients().load("auto", "as stored in the file", False, model=model)["ui"]["text"]
    assert shown == [f"auto uses {selection.choice}, calibrated for this model (the default for step counts it lacks)"]
    shown = ConsistencySolverCoefficients().load("auto", "as stored in the file", False, model=other)["ui"]["text"]
    assert shown == ["auto uses the pack's default default-eps.safetensors: no file is calibrated for this model"]
    # a count the calibrated file does not hold falls back to the default too
    five = nodes.KSampler().sample(model, 3, 5, 4.0, "consistency_solver", "karras", POSITIVE, NEGATIVE, latent)
    assert torch.isfinite(five[0]["samples"]).all()


REDUCED = {
    "flux": (tiny_models.reduced_flux_model, tiny_models.flux_conditioning, 16),
    "sdxl": (tiny_models.reduced_sdxl_model, tiny_models.sdxl_conditioning, 4),
}


@pytest.mark.parametrize("architecture", sorted(REDUCED))
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "uni_pc", "dpm_fast"])
def test_reduced_flux_and_sdxl_calibrate_with_every_kind_of_refine(models_dir, architecture, sampler):
    """ComfyUI's own Flux (flow, guidance, 16 channels) and SDXL (ADM) classes, tiny and random: a file whose report
    lists the validation table, a stochastic refine fitted to its counterpart, a refusal before any call."""
    build, conditioning, channels = REDUCED[architecture]
    model, calls = counted(build())
    latent = {"samples": torch.zeros(2, channels, 8, 8)}
    node = ConsistencySolverCalibrate()
    arguments = (model, conditioning(1), conditioning(2), latent, 3.0, "3", sampler, "simple", 6, 300, "auto", False)
    if sampler == "dpm_fast":
        with pytest.raises(ValueError, match="^Pick a refine sampler in Consistency Solver Calibrate that steps"):
            node.calibrate(*arguments)
        assert calls["count"] == 0
        return
    selection, report = node.calibrate(*arguments)["result"]
    family, training = training_of(models_dir / selection.choice)
    assert family == f"calibrated-{'flow' if architecture == 'flux' else 'eps'}"
    assert training["model_calls"] == calls["count"] <= 300
    assert report.splitlines()[1] == "steps | uses | RMSE | x best stock | x default"
    assert f"\n3 | {training['winners']['3']}" in report and len(training["validation"]["3"]) >= 10
    assert ("noise-free counterpart" in report) == (sampler == "euler_ancestral")
    latent_out, _ = DiffusionPreview().preview(
        model, conditioning(5), conditioning(2), latent, 7, 3, 3.0, "consistency_solver", 1.0, "auto",
        loaded_coefficients=selection,
    )  # fmt: skip
    assert torch.isfinite(latent_out["samples"]).all()


def test_the_node_keeps_a_stock_table_when_the_fit_is_spoiled_and_says_so(models_dir, monkeypatch):
    from consistency_solver.calibration import calibrator

    original = calibrator.greedy_fit

    def spoiled(*args, **kwargs):
        fit = original(*args, **kwargs)
        return type(fit)(fit.weights * 0.3, fit.sigmas, fit.final)

    monkeypatch.setattr(calibrator, "greedy_fit", spoiled)
    model, _ = counted(tiny_models.gaussian_model("eps"))
    selection, report = calibrate(model, name="spoiled")
    _, training = training_of(models_dir / selection.choice)
    assert not any(winner.startswith("calibrated") for winner in training["winners"].values())
    for n, winner in training["winners"].items():
        assert f"At {n} steps the fit lost: the file uses {winner}'s weights and schedule." in report


def test_more_preview_steps_never_measure_worse_or_the_report_says_why(models_dir):
    model, _ = counted(tiny_models.gaussian_model("eps"))
    selection, report = calibrate(model, name="monotone")
    _, training = training_of(models_dir / selection.choice)
    best = {n: training["validation"][n][winner] for n, winner in training["winners"].items()}
    if best["4"] > best["3"]:
        assert training["not_monotone"] and "Note: 4 steps measured worse than 3" in report
    else:
        assert training["not_monotone"] == [] and "Note:" not in report
