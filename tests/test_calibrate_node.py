"""The Consistency Solver Calibrate node in-process on the tiny ComfyUI model: file, reuse, cancel, budget."""

import json

import pytest
import torch
from fixtures.comfyui import require_comfyui

require_comfyui()

import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402
from fixtures import tiny_models  # noqa: E402
from safetensors import safe_open  # noqa: E402

from consistency_solver.nodes import register  # noqa: E402
from consistency_solver.nodes.calibrate import ConsistencySolverCalibrate  # noqa: E402
from consistency_solver.nodes.definitions import DiffusionPreview  # noqa: E402
from consistency_solver.solver import load_coefficients  # noqa: E402

torch.set_num_threads(1)
register()
POSITIVE, NEGATIVE = tiny_models.random_conditioning(1), tiny_models.random_conditioning(2)
LATENT = {"samples": torch.zeros(1, 4, 8, 8)}
NOISES, REFINE_STEPS, STEPS = 4, 10, "3,4"
# 4 noises x 10 refine steps + one rollout of 3 and 4 steps (first steps free): 40 + 4 * 5.
MINIMUM = 60


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    paths = folder_paths.folder_names_and_paths["consistency_solver"]
    folder = tmp_path / "consistency_solver"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "consistency_solver", ([str(folder)], paths[1]))
    return folder


def counting_model(kind="eps", interrupt_after=None):
    """The tiny UNet whose every guided model call (one per latent) is counted; optionally Cancel after some."""
    model = tiny_models.tiny_unet_model(kind).clone()
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


def calibrate(model, budget=400, name="mine", sampler="dpmpp_2m"):
    node = ConsistencySolverCalibrate()
    return node.calibrate(
        model, POSITIVE, NEGATIVE, LATENT, NOISES, 4.0, STEPS, sampler, "simple", REFINE_STEPS, 7, budget, name
    )[0]


def test_the_node_writes_the_file_with_its_metadata_and_a_second_run_makes_no_model_call(models_dir):
    model, calls = counting_model()
    selection = calibrate(model)
    path = models_dir / "mine.safetensors"
    assert selection.choice == "mine.safetensors" and path.is_file()
    first = calls["count"]
    assert MINIMUM <= first <= 400
    assert calls["largest"] == LATENT["samples"].shape[0]  # the LATENT's batch size bounds every model call
    with safe_open(str(path), framework="pt") as handle:
        training = json.loads(handle.metadata()["training"])
    assert training["model_calls"] == first
    assert training["settings"]["refine_sampler"] == "dpmpp_2m" and training["settings"]["steps"] == [3, 4]
    assert {"model_fingerprint", "conditioning_fingerprint", "seconds"} <= training.keys()
    coefficients = load_coefficients(path)
    assert sorted(coefficients.tables) == [3, 4] and coefficients.row_sums == "free"
    assert sorted(coefficients.schedule.positions) == [3, 4]
    for table in coefficients.tables.values():
        assert abs(table[-1].sum().item() - 1) < 1e-6  # the node's previews end fully denoised, as the API's

    again = calibrate(model)
    assert again == selection and calls["count"] == first  # loaded, zero model calls

    latent, _ = DiffusionPreview().preview(
        model, POSITIVE, NEGATIVE, LATENT, 7, 4, 4.0, "consistency_solver", 1.0, "auto", loaded_coefficients=selection
    )
    assert torch.isfinite(latent["samples"]).all()


def test_a_file_made_by_an_older_calibrator_is_fitted_again(models_dir, monkeypatch):
    import consistency_solver.training.calibration as calibration

    model, calls = counting_model()
    calibrate(model)
    first = calls["count"]
    monkeypatch.setattr(calibration, "CALIBRATOR_REVISION", calibration.CALIBRATOR_REVISION + 1)
    calibrate(model)
    assert calls["count"] == 2 * first  # fitted again with the same calls, not loaded


@pytest.mark.parametrize(("kind", "sampler"), [("flow", "euler"), ("v", "heun")])
def test_flow_and_v_models_and_a_two_call_refine_sampler(models_dir, kind, sampler):
    model, calls = counting_model(kind)
    selection = calibrate(model, budget=800, sampler=sampler)
    with safe_open(str(models_dir / "mine.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["model_family"] == f"calibrated-{'flow' if kind == 'flow' else 'eps'}"
    assert json.loads(metadata["training"])["model_calls"] == calls["count"] <= 800
    latent, _ = DiffusionPreview().preview(
        model, POSITIVE, NEGATIVE, LATENT, 7, 3, 4.0, "consistency_solver", 1.0, "auto", loaded_coefficients=selection
    )
    assert torch.isfinite(latent["samples"]).all()


def test_a_budget_below_the_minimum_is_refused_before_any_model_call(models_dir):
    model, calls = counting_model()
    with pytest.raises(
        ValueError, match=f"Raise the budget of Consistency Solver Calibrate to at least {MINIMUM} model calls"
    ):
        calibrate(model, budget=MINIMUM - 1)
    assert calls["count"] == 0
    assert not (models_dir / "mine.safetensors").exists()


def test_cancel_stops_the_calibration_and_leaves_no_file(models_dir):
    model, calls = counting_model(interrupt_after=50)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            calibrate(model)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert calls["count"] <= 54  # stopped at the next call
    assert not any(models_dir.glob("*"))  # neither the file nor a partial one


def test_the_trainers_calibration_runs_on_a_comfyui_model():
    """``--mode calibrate --comfy-checkpoint`` calibrates the trainer's ComfyUI model (here the tiny one)."""
    from consistency_solver.training.evaluation.calibrated import calibrate_bed
    from consistency_solver.training.trainer.comfy_model import ComfyModel

    prompts = [tiny_models.random_conditioning(seed) for seed in (1, 2)]
    model = ComfyModel(
        tiny_models.tiny_unet_model("eps"), prompts, NEGATIVE, cfg=3.0, scheduler="karras", width=64, height=64,
        name="tiny",
    )  # fmt: skip
    calibration = calibrate_bed(model, (3,), budget=200, noises=3, reference_steps=6)
    assert calibration.model_calls == 3 * 6 + 3 * 2
    positions = calibration.coefficients.schedule.positions[3]
    assert positions[0] == 0 and (positions.diff() > 0).all()
