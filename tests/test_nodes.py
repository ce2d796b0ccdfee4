"""The node pack without ComfyUI: declarations, the coefficient resolver and PREVIEW_STATE handling."""

import os
import subprocess
import sys

import pytest
import torch

from consistency_solver.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, coefficients, definitions
from consistency_solver.nodes.coefficients import (
    AUTO,
    CoefficientSelection,
    coefficient_choices,
    file_fingerprint,
    resolve_coefficients,
)
from consistency_solver.nodes.preview_state import (
    PreviewState,
    check_state_fits,
    parse_selection,
    sampling_fingerprint,
    select_previews,
)
from consistency_solver.solver import (
    PRESET_NAMES,
    ConsistencyPolicy,
    PolicyCoefficients,
    Preset,
    TableCoefficients,
    save_coefficients,
)

SCHEDULERS = ["simple", "karras", "normal"]


@pytest.fixture
def live_lists(monkeypatch):
    """What ComfyUI would list: its schedulers and the coefficient files."""
    monkeypatch.setattr(definitions, "scheduler_names", lambda: SCHEDULERS)
    monkeypatch.setattr(definitions, "coefficient_file_names", lambda: ["mine.safetensors"])


def table_file(path, family="any", weights=(1.5, -0.5), steps=4):
    table = torch.tensor([[1.0, 0.0]] + [list(weights)] * (steps - 1), dtype=torch.float64)
    save_coefficients(path, TableCoefficients(tables={steps: table}, order=2), model_family=family)
    return path


def policy_file(path, family="test-eps", trained_steps=(4,)):
    policy = ConsistencyPolicy(order=3, bins=5, hidden=8)
    coefficients = PolicyCoefficients(policy=policy, time_features="log_sigma", trained_steps=trained_steps)
    save_coefficients(path, coefficients, model_family=family)
    return path


def test_importing_the_nodes_needs_no_comfyui():
    code = "import sys, consistency_solver.nodes; assert not any(m.split('.')[0] == 'comfy' for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_node_is_declared_in_the_v1_schema_with_tooltips(live_lists):
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "sampling/consistency_solver", name
        assert callable(getattr(cls, cls.FUNCTION)), name
        inputs = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name


def test_preview_and_refine_declare_the_issue_inputs_and_outputs(live_lists):
    preview = definitions.DiffusionPreview.INPUT_TYPES()
    assert list(preview["required"]) == [
        "model",
        "positive",
        "negative",
        "latent_image",
        "seed",
        "steps",
        "cfg",
        "scheduler",
        "denoise",
        "coefficients",
    ]
    assert preview["required"]["steps"][1]["default"] == 8
    assert preview["required"]["seed"][1]["control_after_generate"] is True
    assert preview["required"]["scheduler"][0] == SCHEDULERS
    assert definitions.DiffusionPreview.RETURN_TYPES == ("LATENT", "PREVIEW_STATE")
    refine = definitions.DiffusionRefine.INPUT_TYPES()
    assert refine["required"]["preview_state"][0] == "PREVIEW_STATE"
    assert refine["required"]["steps"][1]["default"] == 30
    assert refine["required"]["approve"][1]["default"] is False
    assert refine["required"]["select"][1]["default"] == "all"
    assert refine["optional"]["sampler"][0] == "SAMPLER"
    assert refine["required"]["scheduler"][1]["default"] == preview["required"]["scheduler"][1]["default"]
    assert "seed" not in refine["required"]  # the seed travels in the state (a second seed widget would drift)
    assert definitions.SamplerConsistencySolver.RETURN_TYPES == ("SAMPLER",)
    assert definitions.ConsistencySolverCoefficients.RETURN_TYPES == ("CONSISTENCY_COEFFICIENTS",)
    sampler = definitions.SamplerConsistencySolver.INPUT_TYPES()
    assert sampler["optional"]["loaded_coefficients"][0] == "CONSISTENCY_COEFFICIENTS"
    assert sampler["required"]["coefficients"][0] == [AUTO, "mine.safetensors", *PRESET_NAMES]


def test_loader_and_sampler_nodes_pass_the_selection_on():
    (selection,) = definitions.ConsistencySolverCoefficients().load("ab3", "expectation", True)
    assert selection == CoefficientSelection("ab3", "expectation", True)


def test_choices_list_auto_then_files_then_presets():
    assert coefficient_choices(["a.safetensors"]) == ["auto", "a.safetensors", "euler", "ab2", "ab3", "ab4", "ipndm"]


def test_presets_resolve_for_both_model_kinds():
    for kind in ("eps", "flow"):
        assert resolve_coefficients(CoefficientSelection("ab2"), kind, locate=None) == Preset("ab2")


def test_a_file_is_loaded_and_reloaded_when_it_changes(tmp_path):
    path = table_file(tmp_path / "t.safetensors")
    locate = {"t.safetensors": str(path)}.__getitem__
    first = resolve_coefficients(CoefficientSelection("t.safetensors"), "eps", locate)
    assert resolve_coefficients(CoefficientSelection("t.safetensors"), "eps", locate) is first  # cached
    fingerprint = file_fingerprint("t.safetensors", locate)
    table_file(path, weights=(2.0, -1.0))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    second = resolve_coefficients(CoefficientSelection("t.safetensors"), "eps", locate)
    assert second.tables[4][1, 0] == 2.0 and first.tables[4][1, 0] == 1.5
    assert file_fingerprint("t.safetensors", locate) != fingerprint


def test_a_file_for_the_other_model_kind_is_refused(tmp_path):
    eps_file = str(policy_file(tmp_path / "e.safetensors", family="sd15-eps"))
    flow_file = str(table_file(tmp_path / "f.safetensors", family="sd3-flow"))
    locate = {"e": eps_file, "f": flow_file}.__getitem__
    with pytest.raises(ValueError, match="made for eps models.*this model is a flow model"):
        resolve_coefficients(CoefficientSelection("e"), "flow", locate)
    with pytest.raises(ValueError, match="made for flow models.*Fix: choose a file made for eps"):
        resolve_coefficients(CoefficientSelection("f"), "eps", locate)
    assert resolve_coefficients(CoefficientSelection("e"), "eps", locate).order == 3


def test_auto_uses_the_bundled_default_and_names_the_command_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(coefficients, "BUNDLED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"default-flow\.safetensors.*python -m consistency_solver\.training"):
        resolve_coefficients(CoefficientSelection(AUTO), "flow", locate=None)
    table_file(tmp_path / "default-flow.safetensors", family="gmm-flow")
    assert resolve_coefficients(CoefficientSelection(AUTO), "flow", locate=None).order == 2
    with pytest.raises(FileNotFoundError, match="default-eps"):
        resolve_coefficients(CoefficientSelection(AUTO), "eps", locate=None)


def test_inference_mode_and_untrained_steps_reach_the_policy(tmp_path):
    locate = {"p": str(policy_file(tmp_path / "p.safetensors"))}.__getitem__
    stored = resolve_coefficients(CoefficientSelection("p"), "eps", locate)
    assert stored.mode == "mode"
    assert resolve_coefficients(CoefficientSelection("p", "expectation"), "eps", locate).mode == "expectation"
    six_steps = torch.linspace(14.6, 0.0, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="trained for 4-4 steps, not 6"):
        stored.weights(six_steps)
    relaxed = resolve_coefficients(CoefficientSelection("p", allow_untrained_steps=True), "eps", locate)
    assert relaxed.weights(six_steps).shape == (6, 3)


def test_an_unknown_inference_mode_is_refused():
    with pytest.raises(ValueError, match="unknown inference mode"):
        CoefficientSelection(AUTO, "median")


def make_state(batch=3, mask_rows=1, channels=4):
    noise = torch.randn(batch, channels, 2, 2, generator=torch.Generator().manual_seed(0))
    latent = {
        "samples": torch.zeros(batch, channels, 2, 2),
        "batch_index": [5, 6, 7][:batch],
        "noise_mask": torch.arange(mask_rows, dtype=torch.float32).view(mask_rows, 1, 1, 1).expand(mask_rows, 1, 2, 2),
    }
    fingerprint = sampling_fingerprint("eps", ["ModelSamplingDiscrete", "EPS"], [14.6, 0.03], "SD15")
    return PreviewState(
        seed=7,
        noise=noise,
        latent=latent,
        steps=8,
        scheduler="karras",
        cfg=7.0,
        denoise=1.0,
        sigmas=torch.linspace(14.6, 0, 9),
        model_fingerprint=fingerprint,
        coefficients="auto",
    )


@pytest.mark.parametrize(
    ("text", "expected"), [("all", [0, 1, 2]), (" ALL ", [0, 1, 2]), ("0,2", [0, 2]), ("1", [1]), ("-1", [2])]
)
def test_selection_strings(text, expected):
    assert parse_selection(text, 3) == expected


@pytest.mark.parametrize(("text", "message"), [("3", "positions 0 to 2"), ("a,b", "not 'all'"), (" , ", "empty")])
def test_bad_selections_name_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        parse_selection(text, 3)


def test_selecting_previews_slices_noise_latent_and_batch_index_without_touching_the_state():
    state = make_state(mask_rows=3)
    before = state.noise.clone()
    chosen = select_previews(state, [0, 2])
    assert torch.equal(chosen.noise, before[[0, 2]])
    assert chosen.latent["batch_index"] == [5, 7]
    assert chosen.latent["noise_mask"][:, 0, 0, 0].tolist() == [0.0, 2.0]
    assert torch.equal(state.noise, before) and state.latent["batch_index"] == [5, 6, 7]
    assert select_previews(state, [0, 1, 2]) is state


def test_a_shorter_mask_batch_repeats_like_comfyui():
    chosen = select_previews(make_state(mask_rows=2), [1, 2])
    assert chosen.latent["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 0.0]  # rows 1 and 2 % 2


def test_a_state_from_another_model_sampling_or_latent_shape_is_refused():
    state = make_state()
    check_state_fits(state, state.model_fingerprint, 4)
    other = sampling_fingerprint("flow", ["ModelSamplingDiscreteFlow", "CONST"], [1.0, 0.003], "SD3")
    with pytest.raises(ValueError, match="different model sampling.*Fix: connect the same model"):
        check_state_fits(state, other, 4)
    with pytest.raises(ValueError, match="4 channels, but the refine model expects 16"):
        check_state_fits(state, state.model_fingerprint, 16)
