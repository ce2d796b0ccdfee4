"""End to end through a real headless ComfyUI server: the pack loads, its nodes validate and run over HTTP."""

import json
from pathlib import Path

import pytest
import torch
from fixtures.comfyui import require_comfyui
from fixtures.example_workflows import EXAMPLES, EXAMPLES_DIR, stand_in_models
from safetensors.torch import load_file

from consistency_solver.solver import StepSchedule, TableCoefficients, save_coefficients

require_comfyui()

from fixtures.comfy_server import ComfyServer  # noqa: E402
from fixtures.workflows import check_workflow  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
COEFFICIENT_FILE = "test-table.safetensors"
OUR_NODES = (
    "ConsistencySolverCoefficients",
    "SamplerConsistencySolver",
    "DiffusionPreview",
    "DiffusionRefine",
    "ConsistencySolverCalibrate",
)
SCHEDULE = StepSchedule({4: torch.tensor([0.0, 0.3, 0.55, 0.8], dtype=torch.float64)})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    stand_in_models(base)
    table = torch.tensor([[1.0, 0.0]] + [[1.5, -0.5]] * 3, dtype=torch.float64)
    coefficients = TableCoefficients(tables={4: table}, order=2, schedule=SCHEDULE)
    save_coefficients(base / "models" / "consistency_solver" / COEFFICIENT_FILE, coefficients, model_family="any")
    running = ComfyServer(base, {"consistency_solver": REPOSITORY, "test_pack": Path(__file__).parent / "fixtures"
                                 / "comfy_test_pack"})  # fmt: skip
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_the_pack_loads_and_registers_its_sampler_and_nodes(server):
    # ComfyUI's own optional extras may fail here (no kornia/spandrel); the custom-node packs must not.
    assert not [line for line in server.log().splitlines() if "IMPORT FAILED" in line and "custom_nodes" in line]
    info = server.get("/object_info")
    assert "consistency_solver" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert "consistency_solver" in info["KSamplerAdvanced"]["input"]["required"]["sampler_name"][0]
    assert "consistency_solver" in info["KSamplerSelect"]["input"]["required"]["sampler_name"][0]
    for name in OUR_NODES:
        assert info[name]["category"] == "sampling/consistency_solver"
    assert info["ConsistencySolverScheduler"]["category"] == "sampling/custom_sampling/schedulers"
    assert info["ConsistencySolverScheduler"]["output"] == ["SIGMAS"]
    assert info["ConsistencySolverScheduler"]["display_name"] == "Consistency Solver Scheduler"
    for node in ("KSampler", "KSamplerAdvanced", "BasicScheduler", "DiffusionPreview", "DiffusionRefine"):
        assert "consistency_solver" in info[node]["input"]["required"]["scheduler"][0], node
    # What artists are offered: auto, the defaults, their own files, the presets marked untrained; no test beds.
    assert info["DiffusionPreview"]["input"]["required"]["coefficients"][0] == [
        "auto", "default-eps.safetensors", "default-flow.safetensors", COEFFICIENT_FILE,
        "euler (untrained)", "ab2 (untrained)", "ab3 (untrained)", "ab4 (untrained)", "ipndm (untrained)",
    ]  # fmt: skip
    assert info["DiffusionPreview"]["output"] == ["LATENT", "PREVIEW_STATE"]


def test_preview_then_refine_then_save_latent_over_http(server):
    prompt = {
        "1": {"class_type": "TinyTestModel", "inputs": {"kind": "eps", "seed": 0}},
        "2": {"class_type": "TinyTestConditioning", "inputs": {"seed": 1}},
        "3": {"class_type": "TinyTestConditioning", "inputs": {"seed": 2}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {
            "class_type": "DiffusionPreview",
            "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                       "seed": 11, "steps": 4, "cfg": 4.0, "scheduler": "karras", "denoise": 1.0,
                       "coefficients": COEFFICIENT_FILE},
        },
        "6": {
            "class_type": "DiffusionRefine",
            "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "preview_state": ["5", 1],
                       "approve": True, "select": "all", "steps": 6, "cfg": 4.0, "scheduler": "karras"},
        },
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/refined"}},
    }  # fmt: skip
    reply = server.post_prompt(prompt)
    assert reply.get("node_errors") == {}, reply
    history = server.wait_for_history(reply["prompt_id"])
    assert history["status"]["status_str"] == "success", history["status"]
    saved = history["outputs"]["7"]["latents"][0]
    latent = load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]
    assert latent.shape == (2, 4, 8, 8) and torch.isfinite(latent).all()


def calibrate_prompt(model_seed: int, prompt_seed: int) -> dict:
    """The example workflow's loop with the tiny model: Calibrate feeds the Preview, the Refine renders."""
    model = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0]}
    return {
        "1": {"class_type": "TinyTestModel", "inputs": {"kind": "eps", "seed": model_seed}},
        "2": {"class_type": "TinyTestConditioning", "inputs": {"seed": prompt_seed}},
        "3": {"class_type": "TinyTestConditioning", "inputs": {"seed": 2}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "ConsistencySolverCalibrate",
              "inputs": {**model, "latent_image": ["4", 0], "cfg": 4.0, "preview_steps": "4",
                         "refine_sampler": "dpmpp_2m", "refine_scheduler": "karras", "refine_steps": 8,
                         "budget": 400, "file_name": "auto", "recalibrate_for_each_prompt": False}},
        "6": {"class_type": "DiffusionPreview",
              "inputs": {**model, "latent_image": ["4", 0], "seed": 11, "steps": 4, "cfg": 4.0,
                         "scheduler": "consistency_solver", "denoise": 1.0, "coefficients": "auto",
                         "loaded_coefficients": ["5", 0]}},
        "7": {"class_type": "DiffusionRefine",
              "inputs": {**model, "preview_state": ["6", 1], "approve": True, "select": "all", "steps": 8,
                         "cfg": 4.0, "scheduler": "karras"}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/calibrated"}},
    }  # fmt: skip


def test_calibrate_once_per_model_over_http(server):
    """A prompt edit reuses the model's calibration (its file is not written again); another model calibrates."""
    folder = server.base / "models" / "consistency_solver"

    def run(model_seed, prompt_seed):
        reply = server.post_prompt(calibrate_prompt(model_seed, prompt_seed))
        assert reply.get("node_errors") == {}, reply
        history = server.wait_for_history(reply["prompt_id"])
        assert history["status"]["status_str"] == "success", history["status"]
        return {path.name: path.stat().st_mtime_ns for path in folder.glob("calibrated-*.safetensors")}

    first = run(0, 1)
    assert len(first) == 1
    assert run(0, 5) == first  # the prompt edited: the same file, untouched
    other = run(1, 5)
    assert len(other) == 2 and all(other[name] == first[name] for name in first)


def learned_schedule_prompt(steps):
    """SamplerCustom with the SAMPLER and scheduler nodes reading the test file, then SaveLatent."""
    return {
        "1": {"class_type": "TinyTestModel", "inputs": {"kind": "flow", "seed": 0}},
        "2": {"class_type": "TinyTestConditioning", "inputs": {"seed": 1}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "ConsistencySolverCoefficients",
              "inputs": {"coefficients": COEFFICIENT_FILE, "inference_mode": "as stored in the file",
                         "allow_untrained_steps": False}},
        "6": {"class_type": "SamplerConsistencySolver",
              "inputs": {"coefficients": "auto", "inference_mode": "as stored in the file",
                         "allow_untrained_steps": False, "loaded_coefficients": ["5", 0]}},
        "7": {"class_type": "ConsistencySolverScheduler",
              "inputs": {"model": ["1", 0], "steps": steps, "denoise": 1.0, "coefficients": "auto",
                         "loaded_coefficients": ["5", 0]}},
        "8": {"class_type": "SamplerCustom",
              "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 3, "cfg": 3.0, "positive": ["2", 0],
                         "negative": ["2", 0], "sampler": ["6", 0], "sigmas": ["7", 0], "latent_image": ["4", 0]}},
        "9": {"class_type": "SaveLatent",
              "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/learned{steps}"}},
    }  # fmt: skip


def test_sampler_custom_on_the_learned_schedule_over_http(server):
    reply = server.post_prompt(learned_schedule_prompt(4))
    assert reply.get("node_errors") == {}, reply
    history = server.wait_for_history(reply["prompt_id"])
    assert history["status"]["status_str"] == "success", history["status"]
    saved = history["outputs"]["9"]["latents"][0]
    latent = load_file(server.base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_an_untrained_step_count_fails_with_the_fix_in_the_ui_message(server):
    reply = server.post_prompt(learned_schedule_prompt(5))
    assert reply.get("node_errors") == {}, reply
    history = server.wait_for_history(reply["prompt_id"])
    assert history["status"]["status_str"] == "error"
    errors = [data for event, data in history["status"]["messages"] if event == "execution_error"]
    assert errors[0]["node_type"] == "ConsistencySolverScheduler"
    assert errors[0]["exception_message"].strip() == (
        "Set steps to 4 in Consistency Solver Scheduler, or use BasicScheduler: the consistency_solver scheduler "
        "uses the schedule learned with the coefficient file 'test-table.safetensors', which covers 4 steps, not 5."
    )


@pytest.mark.parametrize("preset", ["ab2 (untrained)", "ab2"])
def test_a_preset_runs_by_its_marked_name_and_by_the_bare_name_older_workflows_saved(server, preset):
    prompt = learned_schedule_prompt(4)
    del prompt["5"], prompt["6"]["inputs"]["loaded_coefficients"]
    prompt["6"]["inputs"]["coefficients"] = preset
    prompt["7"] = {"class_type": "BasicScheduler",
                   "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 4, "denoise": 1.0}}  # fmt: skip
    reply = server.post_prompt(prompt)
    assert reply.get("node_errors") == {}, reply
    history = server.wait_for_history(reply["prompt_id"])
    assert history["status"]["status_str"] == "success", history["status"]


def test_a_coefficient_choice_that_is_gone_is_refused_before_running(server):
    prompt = learned_schedule_prompt(4)
    prompt["5"]["inputs"]["coefficients"] = "gone.safetensors"
    reply = server.post_prompt(prompt)
    errors = reply["node_errors"]["5"]["errors"]
    assert "Pick another coefficients entry: 'gone.safetensors' is not in the list" in errors[0]["details"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_workflows_match_the_live_node_definitions(server, name):
    workflow = json.loads((EXAMPLES_DIR / f"{name}.json").read_text())
    assert check_workflow(workflow, server.get("/object_info")) == []
