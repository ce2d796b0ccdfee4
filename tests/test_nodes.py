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
    describe_choice,
    file_fingerprint,
    learned_sigmas,
    resolve_coefficients,
    schedule_steps,
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
    StepSchedule,
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
        assert cls.CATEGORY == "sampling/consistency_solver" or cls.RETURN_TYPES == ("SIGMAS",), name
        assert cls.DESCRIPTION, name
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
    with pytest.raises(ValueError, match="trained for 4 steps, not 6"):
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


def learned_schedule(counts=(4, 5, 8)):
    """Distinctive positions (not karras, not log-uniform) for each step count."""
    return StepSchedule({n: torch.linspace(0, 1, n + 1, dtype=torch.float64)[:-1] ** 0.7 for n in counts})


def scheduled_table(schedule=None):
    tables = {n: torch.tensor([[1.0, 0.0]] + [[1.5, -0.5]] * (n - 1), dtype=torch.float64) for n in (4, 5, 8)}
    return TableCoefficients(tables=tables, order=2, schedule=schedule or learned_schedule())


def test_the_scheduler_node_sits_with_the_stock_schedulers(live_lists):
    node = definitions.ConsistencySolverScheduler
    assert node.CATEGORY == "sampling/custom_sampling/schedulers"
    assert node.RETURN_TYPES == ("SIGMAS",)
    inputs = node.INPUT_TYPES()
    assert list(inputs["required"]) == ["model", "steps", "denoise", "coefficients"]
    assert inputs["required"]["coefficients"][0] == [AUTO, "mine.safetensors", *PRESET_NAMES]
    assert inputs["required"]["denoise"][1]["min"] == 0.0  # as BasicScheduler: 0 gives no steps
    assert inputs["optional"]["loaded_coefficients"][0] == "CONSISTENCY_COEFFICIENTS"
    assert "--schedule learned" in node.DESCRIPTION
    assert NODE_DISPLAY_NAME_MAPPINGS["ConsistencySolverScheduler"] == "Consistency Solver Scheduler"


def test_the_preview_defaults_to_the_learned_schedule_and_the_refine_to_a_stock_one(live_lists, monkeypatch):
    monkeypatch.setattr(definitions, "scheduler_names", lambda: [*SCHEDULERS, "consistency_solver"])
    preview = definitions.DiffusionPreview.INPUT_TYPES()["required"]["scheduler"]
    refine = definitions.DiffusionRefine.INPUT_TYPES()["required"]["scheduler"]
    assert preview[1]["default"] == "consistency_solver" and preview[1]["default"] in preview[0]
    assert refine[1]["default"] == "simple"  # 30 steps: no learned schedule covers them
    assert "consistency_solver" in refine[1]["tooltip"]


def test_learned_sigmas_are_the_schedule_over_the_model_range():
    source = scheduled_table()
    sigmas = learned_sigmas(source, 5, 1.0, 0.03, 14.6, "file")
    assert sigmas.dtype == torch.float32 and sigmas.shape == (6,)
    torch.testing.assert_close(sigmas, source.schedule.sigmas(5, 0.03, 14.6).float())
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == 0.0


def test_denoise_below_one_keeps_the_tail_of_the_longer_schedule_like_basic_scheduler():
    source = scheduled_table()
    assert schedule_steps(4, 0.5) == 8 and schedule_steps(4, 1.0) == 4 and schedule_steps(5, 0.6) == 8
    tail = learned_sigmas(source, 4, 0.5, 0.03, 14.6, "file")
    torch.testing.assert_close(tail, source.schedule.sigmas(8, 0.03, 14.6)[-5:].float())
    assert learned_sigmas(source, 4, 0.0, 0.03, 14.6, "file").numel() == 0


def test_a_source_without_a_schedule_names_the_fix():
    for source, name in ((Preset("euler"), "the preset 'euler'"), (TableCoefficients({4: torch.ones(4, 1)}, 1), "f")):
        with pytest.raises(ValueError, match="reads the schedule learned with the coefficients") as error:
            learned_sigmas(source, 4, 1.0, 0.03, 14.6, name)
        message = str(error.value)
        assert f"none in {name}. Fix:" in message and "--schedule learned" in message and "another scheduler" in message


def test_an_untrained_step_count_names_the_trained_ones_and_the_denoise_total():
    source = scheduled_table()
    with pytest.raises(ValueError, match=r"covers 4, 5, 8 steps, not 6 steps\. Fix: pick a trained step count"):
        learned_sigmas(source, 6, 1.0, 0.03, 14.6, "file 'x'")
    with pytest.raises(ValueError, match=r"not 10 steps \(5 steps at denoise 0.5\).*--schedule learned"):
        learned_sigmas(source, 5, 0.5, 0.03, 14.6, "file 'x'")
    full = StepSchedule({n: torch.linspace(0, 0.9, n, dtype=torch.float64) for n in range(4, 13)})
    with pytest.raises(ValueError, match=r"covers 4-12 steps, not 30 steps; KSampler"):
        learned_sigmas(scheduled_table(full), 30, 1.0, 0.03, 14.6, "file", steps_note="; KSampler ...")


def test_choices_are_named_in_errors():
    assert describe_choice(AUTO, "flow") == "the pack's default coefficients for flow models (default-flow.safetensors)"
    assert describe_choice("ab2", "eps") == "the preset 'ab2'"
    assert describe_choice("mine.safetensors", "eps") == "coefficient file 'mine.safetensors'"


def test_a_saved_schedule_resolves_through_the_node_resolver(tmp_path):
    path = tmp_path / "s.safetensors"
    save_coefficients(path, scheduled_table(), model_family="test-flow")
    source = resolve_coefficients(CoefficientSelection("s"), "flow", {"s": str(path)}.__getitem__)
    torch.testing.assert_close(
        learned_sigmas(source, 8, 1.0, 0.003, 1.0, "s"), learned_schedule().sigmas(8, 0.003, 1.0).float()
    )
