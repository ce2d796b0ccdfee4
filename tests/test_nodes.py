"""The node pack without ComfyUI: declarations, the coefficient resolver and PREVIEW_STATE handling."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from consistency_solver.nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    coefficients,
    definitions,
    widgets,
)
from consistency_solver.nodes.coefficients import (
    AUTO,
    CoefficientSelection,
    NoLearnedSchedule,
    WrongModelFamily,
    choice_from_widget,
    coefficient_choices,
    describe_choice,
    file_fingerprint,
    learned_sigmas,
    resolve_coefficients,
    runnable_steps,
    schedule_steps,
)
from consistency_solver.nodes.messages import (
    PREVIEW,
    REFINE,
    SAMPLER_BY_NAME,
    SAMPLER_NODE,
    SCHEDULER_BY_NAME,
    SCHEDULER_NODE,
    Run,
    RunProblem,
    problems_of,
    user_message,
    worded,
    worded_at,
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
    CoefficientFileError,
    ConsistencyPolicy,
    InvalidWeights,
    PolicyCoefficients,
    Preset,
    StepSchedule,
    TableCoefficients,
    UntrainedStepCount,
    save_coefficients,
)

SCHEDULERS = ["simple", "karras", "normal"]
MARKED_PRESETS = [f"{name} (untrained)" for name in PRESET_NAMES]


@pytest.fixture
def live_lists(monkeypatch):
    """What ComfyUI would list: its schedulers and the coefficient files."""
    monkeypatch.setattr(widgets, "scheduler_names", lambda: SCHEDULERS)
    monkeypatch.setattr(widgets, "coefficient_file_names", lambda: ["mine.safetensors"])
    monkeypatch.setattr(widgets, "sampler_names", lambda: ["euler", "dpmpp_2m"])


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
    assert sampler["required"]["coefficients"][0] == [AUTO, "mine.safetensors", *MARKED_PRESETS]


def test_the_preview_shows_its_previews_only_when_a_vae_is_connected(live_lists, monkeypatch):
    """Without a VAE the preview returns what it did before; with one it adds the images to show (issue 23)."""
    vae_input = definitions.DiffusionPreview.INPUT_TYPES()["optional"]["vae"]
    assert vae_input[0] == "VAE" and "click" in vae_input[1]["tooltip"]
    assert definitions.DiffusionPreview.OUTPUT_NODE is True  # shows its previews with nothing after it
    assert "click the previews" in definitions.DiffusionRefine.INPUT_TYPES()["required"]["select"][1]["tooltip"]
    shown = []

    class Runtime:
        @staticmethod
        def run_preview(model, positive, negative, latent_image, request):
            return {"samples": "preview"}, "state"

        @staticmethod
        def preview_images(vae, preview, state):
            shown.append((vae, preview, state))
            return {"images": ["decoded"]}

    monkeypatch.setattr(definitions, "_runtime", lambda: Runtime)
    settings = ("model", "positive", "negative", {"samples": "empty"}, 42, 8, 7.0, "karras", 1.0, "auto")
    assert definitions.DiffusionPreview().preview(*settings) == ({"samples": "preview"}, "state")
    assert shown == []
    with_vae = definitions.DiffusionPreview().preview(*settings, vae="vae")
    assert with_vae == {"ui": {"images": ["decoded"]}, "result": ({"samples": "preview"}, "state")}
    assert shown == [("vae", {"samples": "preview"}, "state")]


def test_loader_and_sampler_nodes_pass_the_selection_on():
    (selection,) = definitions.ConsistencySolverCoefficients().load("ab3", "expectation", True)["result"]
    assert selection == CoefficientSelection("ab3", "expectation", True)


def test_choices_list_auto_then_files_then_presets_marked_untrained():
    assert coefficient_choices(["a.safetensors"]) == ["auto", "a.safetensors", *MARKED_PRESETS]
    assert MARKED_PRESETS[0] == "euler (untrained)"


def test_a_marked_preset_and_its_bare_name_of_older_workflows_choose_the_preset(live_lists):
    assert choice_from_widget("ab3 (untrained)") == choice_from_widget("ab3") == "ab3"
    assert choice_from_widget("mine.safetensors") == "mine.safetensors"
    (selection,) = definitions.ConsistencySolverCoefficients().load("ab3 (untrained)", "expectation", True)["result"]
    assert selection == CoefficientSelection("ab3", "expectation", True)
    for node in (definitions.SamplerConsistencySolver, definitions.DiffusionPreview):
        for value in ("ab3", "ab3 (untrained)", "mine.safetensors", "auto"):
            assert node.VALIDATE_INPUTS(coefficients=value) is True, value
        assert node.VALIDATE_INPUTS(coefficients="gone.safetensors").startswith("Pick another coefficients entry")


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
    with pytest.raises(WrongModelFamily) as error:
        resolve_coefficients(CoefficientSelection("e"), "flow", locate)
    assert (error.value.path, error.value.file_kind, error.value.kind) == (eps_file, "eps", "flow")
    with pytest.raises(WrongModelFamily, match="made for flow models, not eps models"):
        resolve_coefficients(CoefficientSelection("f"), "eps", locate)
    assert resolve_coefficients(CoefficientSelection("e"), "eps", locate).order == 3


def test_auto_uses_the_bundled_default_and_a_missing_one_is_a_file_error(tmp_path, monkeypatch):
    monkeypatch.setattr(coefficients, "BUNDLED_DIR", tmp_path)
    with pytest.raises(CoefficientFileError, match=r"default-flow\.safetensors': no such file"):
        resolve_coefficients(CoefficientSelection(AUTO), "flow", locate=None)
    table_file(tmp_path / "default-flow.safetensors", family="gmm-flow")
    assert resolve_coefficients(CoefficientSelection(AUTO), "flow", locate=None).order == 2
    with pytest.raises(CoefficientFileError, match="default-eps"):
        resolve_coefficients(CoefficientSelection(AUTO), "eps", locate=None)


def test_inference_mode_and_untrained_steps_reach_the_policy(tmp_path):
    locate = {"p": str(policy_file(tmp_path / "p.safetensors"))}.__getitem__
    stored = resolve_coefficients(CoefficientSelection("p"), "eps", locate)
    assert stored.mode == "mode"
    assert resolve_coefficients(CoefficientSelection("p", "expectation"), "eps", locate).mode == "expectation"
    six_steps = torch.linspace(14.6, 0.0, 7, dtype=torch.float64)
    with pytest.raises(UntrainedStepCount, match="trained for 4 steps, not 6"):
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3", r"^Pick previews 0 to 2 \(or 'all'\) in Diffusion Refine's select: '3' names \[3\]"),
        ("a,b", r"^Type 'all' or positions such as '0,2' in Diffusion Refine's select: 'a,b' is neither"),
        (" , ", r"^Type 'all' or the previews to refine, such as '0,2', in Diffusion Refine's select: it is empty"),
    ],
)
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


@pytest.mark.parametrize("shape", [(2, 2), (1, 2, 2), (1, 1, 2, 2)])
def test_a_mask_without_a_batch_of_its_own_covers_every_selected_preview(shape):
    state = make_state()
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.5]]).reshape(shape)
    chosen = select_previews(replace(state, latent={**state.latent, "noise_mask": mask}), [0, 2])
    assert torch.equal(chosen.latent["noise_mask"], mask.reshape(1, 1, 2, 2).expand(2, 1, 2, 2))


def test_a_video_mask_of_fewer_than_five_dims_is_one_mask_for_the_batch():
    state = make_state()
    video = {**state.latent, "samples": torch.zeros(3, 4, 3, 2, 2), "noise_mask": torch.rand(3, 2, 2)}
    chosen = select_previews(replace(state, noise=torch.zeros(3, 4, 3, 2, 2), latent=video), [1])
    assert torch.equal(chosen.latent["noise_mask"], video["noise_mask"].reshape(1, 1, 3, 2, 2))


def test_a_state_from_another_model_sampling_or_latent_shape_is_refused():
    state = make_state()
    check_state_fits(state, state.model_fingerprint, 4)
    other = sampling_fingerprint("flow", ["ModelSamplingDiscreteFlow", "CONST"], [1.0, 0.003], "SD3")
    with pytest.raises(ValueError, match="^Connect the same model .* to Diffusion Preview and Diffusion Refine"):
        check_state_fits(state, other, 4)
    with pytest.raises(ValueError, match="^Refine with the model that made the preview: its latent has 4 channels"):
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
    assert inputs["required"]["coefficients"][0] == [AUTO, "mine.safetensors", *MARKED_PRESETS]
    assert inputs["required"]["denoise"][1]["min"] == 0.0  # as BasicScheduler: 0 gives no steps
    assert inputs["optional"]["loaded_coefficients"][0] == "CONSISTENCY_COEFFICIENTS"
    assert "python" not in node.DESCRIPTION and "--" not in node.DESCRIPTION
    assert NODE_DISPLAY_NAME_MAPPINGS["ConsistencySolverScheduler"] == "Consistency Solver Scheduler"


def test_the_preview_defaults_to_the_learned_schedule_and_the_refine_to_a_stock_one(live_lists, monkeypatch):
    monkeypatch.setattr(widgets, "scheduler_names", lambda: [*SCHEDULERS, "consistency_solver"])
    preview = definitions.DiffusionPreview.INPUT_TYPES()["required"]["scheduler"]
    refine = definitions.DiffusionRefine.INPUT_TYPES()["required"]["scheduler"]
    assert preview[1]["default"] == "consistency_solver" and preview[1]["default"] in preview[0]
    assert refine[1]["default"] == "simple"  # 30 steps: no learned schedule covers them
    assert "consistency_solver" in refine[1]["tooltip"]


def test_learned_sigmas_are_the_schedule_over_the_model_range():
    source = scheduled_table()
    sigmas = learned_sigmas(source, 5, 1.0, 0.03, 14.6)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (6,)
    torch.testing.assert_close(sigmas, source.schedule.sigmas(5, 0.03, 14.6).float())
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == 0.0


def test_denoise_below_one_keeps_the_tail_of_the_longer_schedule_like_basic_scheduler():
    source = scheduled_table()
    assert schedule_steps(4, 0.5) == 8 and schedule_steps(4, 1.0) == 4 and schedule_steps(5, 0.6) == 8
    tail = learned_sigmas(source, 4, 0.5, 0.03, 14.6)
    torch.testing.assert_close(tail, source.schedule.sigmas(8, 0.03, 14.6)[-5:].float())
    assert learned_sigmas(source, 4, 0.0, 0.03, 14.6).numel() == 0


def test_a_source_without_a_schedule_or_an_untrained_total_raises_the_facts():
    for source in (Preset("euler"), TableCoefficients({4: torch.ones(4, 1)}, 1)):
        with pytest.raises(NoLearnedSchedule):
            learned_sigmas(source, 4, 1.0, 0.03, 14.6)
    with pytest.raises(UntrainedStepCount) as error:
        learned_sigmas(scheduled_table(), 5, 0.5, 0.03, 14.6)
    assert (error.value.what, error.value.asked, error.value.trained) == ("schedule", 10, (4, 5, 8))


def test_runnable_steps_meet_the_coefficients_and_the_learned_schedule():
    source = scheduled_table()  # weights and schedules for 4, 5 and 8 steps
    assert runnable_steps(source, 1.0, learned_schedule=False, coefficients=True) == [4, 5, 8]
    assert runnable_steps(source, 0.5, learned_schedule=True, coefficients=True) == [4]  # 4 / 0.5 = 8
    assert runnable_steps(source, 0.5, learned_schedule=True, coefficients=False) == [2, 4]
    assert runnable_steps(source, 0.3, learned_schedule=True, coefficients=True) == []
    assert runnable_steps(Preset("ab2"), 1.0, learned_schedule=False, coefficients=True) == []


def test_choices_are_named_in_errors():
    assert describe_choice(AUTO, "flow") == "the pack's default coefficient file default-flow.safetensors"
    assert describe_choice("ab2", "eps") == "the preset 'ab2 (untrained)'"
    assert describe_choice("mine.safetensors", "eps") == "the coefficient file 'mine.safetensors'"


def full_range_table(counts=range(4, 13)):
    """Like the pack's defaults: weights and a learned schedule for 4-12 steps."""
    schedule = StepSchedule({n: torch.linspace(0, 0.9, n, dtype=torch.float64) for n in counts})
    tables = {n: torch.tensor([[1.0, 0.0]] + [[1.5, -0.5]] * (n - 1), dtype=torch.float64) for n in counts}
    return TableCoefficients(tables=tables, order=2, schedule=schedule)


DEFAULT = "the pack's default coefficient file default-eps.safetensors"


def run(place, **settings):
    return Run(AUTO, DEFAULT, place=place, **settings)


def policy_with_schedule(counts=range(4, 13)):
    schedule = StepSchedule({n: torch.linspace(0, 0.9, n, dtype=torch.float64) for n in counts})
    policy = ConsistencyPolicy(order=3, bins=5, hidden=8)
    return PolicyCoefficients(policy, "log_sigma", tuple(counts), schedule=schedule)


def test_untrained_step_counts_are_worded_for_each_node():
    source = full_range_table()
    table_error = UntrainedStepCount("table", 20, range(4, 13))
    assert user_message(table_error, run(PREVIEW, steps=20, source=source)) == (
        f"Set steps to 4-12 in Diffusion Preview: {DEFAULT} was trained for 4-12 steps, not 20."
    )
    assert user_message(table_error, run(SAMPLER_BY_NAME, steps=20, source=source)) == (
        "Set steps to 4-12 for the consistency_solver sampler, or pick another sampler: "
        f"{DEFAULT} was trained for 4-12 steps, and this run has 20."
    )
    assert user_message(table_error, run(SAMPLER_NODE, steps=20, source=source)) == (
        "Give the Consistency Solver Sampler 4-12 steps (the steps of the scheduler that makes its sigmas): "
        f"{DEFAULT} was trained for 4-12 steps, not 20."
    )
    policy_error = UntrainedStepCount("policy", 20, range(4, 13))
    policy = policy_with_schedule()
    assert "or turn on its allow_untrained_steps:" in user_message(policy_error, run(SAMPLER_NODE, source=policy))
    for place in (PREVIEW, SAMPLER_BY_NAME):  # neither has that switch
        assert "allow" not in user_message(policy_error, run(place, steps=20, source=policy))


def test_at_denoise_below_one_the_preview_names_the_counts_that_fit_both_the_weights_and_the_schedule():
    """U1: the weights are checked on the steps the sampler runs, the learned schedule on steps / denoise."""
    source = full_range_table()
    error = UntrainedStepCount("table", 3, range(4, 13))
    at_half = run(PREVIEW, steps=3, denoise=0.5, learned_schedule=True, source=source)
    assert user_message(error, at_half) == (
        "Set steps to 4-6 in Diffusion Preview, or pick a stock scheduler and set steps to 4-12: "
        f"{DEFAULT} was trained for 4-12 steps, not 3, and at denoise 0.5 the learned schedule needs steps / denoise "
        "within 4-12."
    )
    too_low = run(PREVIEW, steps=3, denoise=0.3, learned_schedule=True, source=source)
    assert user_message(error, too_low).startswith(  # no trained count n has int(n / 0.3) within 4-12
        "Pick a stock scheduler and set steps to 4-12 in Diffusion Preview, or raise denoise: "
    )
    schedule_error = UntrainedStepCount("schedule", 14, range(4, 13))
    assert user_message(schedule_error, replace(at_half, steps=7)) == (  # 7 steps run on a stock schedule
        "Set steps to 4-6 in Diffusion Preview, or pick a stock scheduler: the consistency_solver scheduler uses "
        f"the schedule learned with {DEFAULT}, which covers 4-12 steps, not 14 (steps / denoise at denoise 0.5)."
    )
    on_stock = run(PREVIEW, steps=13, learned_schedule=True, source=source)  # a stock schedule would not help
    assert user_message(UntrainedStepCount("schedule", 13, range(4, 13)), on_stock).startswith(
        "Set steps to 4-12 in Diffusion Preview: the consistency_solver scheduler"
    )
    refine = run(REFINE, steps=30, denoise=1.0, learned_schedule=True, source=source)
    assert user_message(UntrainedStepCount("schedule", 30, range(4, 13)), refine).startswith(
        "Set steps to 4-12 in Diffusion Refine, or pick a stock scheduler: "
    )


def test_the_scheduler_by_name_and_the_scheduler_node_say_what_to_change():
    error = UntrainedStepCount("schedule", 16, range(4, 13))
    by_name = run(SCHEDULER_BY_NAME, steps=16, learned_schedule=True, one_more_step=("uni_pc",))
    assert user_message(error, by_name) == (
        "Set steps so that the consistency_solver scheduler is asked for 4-12 steps, or pick another scheduler: "
        f"the schedule learned with {DEFAULT} covers 4-12 steps, and this run asks for 16. Below denoise 1 a run "
        "asks for steps / denoise (8 steps at denoise 0.5 ask for 16); uni_pc ask for one step more."
    )
    node = run(SCHEDULER_NODE, steps=16, learned_schedule=True, source=full_range_table())
    assert user_message(error, node).startswith(
        "Set steps to 4-12 in Consistency Solver Scheduler, or use BasicScheduler"
    )


def test_missing_schedules_files_and_families_are_worded_for_each_node():
    ab2 = Run("ab2", "the preset 'ab2 (untrained)'", learned_schedule=True, place=PREVIEW)
    assert user_message(NoLearnedSchedule(), ab2) == (
        "Pick a stock scheduler (simple, karras, ...) in Diffusion Preview, or coefficients that carry a learned "
        "schedule such as 'auto': the preset 'ab2 (untrained)' carries no learned schedule, which the "
        "consistency_solver scheduler needs."
    )
    assert user_message(NoLearnedSchedule(), run(SCHEDULER_BY_NAME)).startswith(
        "Pick another scheduler than consistency_solver: "
    )
    broken = CoefficientFileError("/x/models/consistency_solver/mine.safetensors", "no such file", "put it back")
    mine = Run("mine.safetensors", "the coefficient file 'mine.safetensors'", place=SAMPLER_NODE)
    assert user_message(broken, mine) == (
        "Choose other coefficients in Consistency Solver Sampler: the coefficient file 'mine.safetensors' cannot "
        "be used (no such file)."
    )
    default = CoefficientFileError("/pack/solver/bundled/default-eps.safetensors", "no such file", "retrain")
    assert user_message(default, run(SAMPLER_BY_NAME)) == (
        "Reinstall the ConsistencySolver node pack, or pick another sampler than consistency_solver: its default "
        "coefficient file default-eps.safetensors cannot be used (no such file)."
    )
    family = WrongModelFamily("/x/sd15.safetensors", "eps", "flow")
    assert user_message(family, Run("sd15.safetensors", "the coefficient file 'sd15.safetensors'", place=PREVIEW)) == (
        "Choose coefficients made for flow models (SD3, Flux) in Diffusion Preview ('auto' picks the pack's default "
        "for the model): the coefficient file 'sd15.safetensors' was made for SD1.5/SDXL-type models."
    )
    weights = InvalidWeights("the sigmas are not all finite")
    assert user_message(weights, run(SAMPLER_BY_NAME)).startswith("Pick another sampler than consistency_solver: ")


def test_no_message_offers_python_syntax_a_command_line_or_a_switch_the_node_lacks():
    source = policy_with_schedule()
    problems = [
        UntrainedStepCount("policy", 20, range(4, 13)),
        UntrainedStepCount("schedule", 20, range(4, 13)),
        NoLearnedSchedule(),
        CoefficientFileError("/x/default-eps.safetensors", "bad", "re-create it with `python -m x`"),
        WrongModelFamily("/x/f.safetensors", "flow", "eps"),
        InvalidWeights("rows do not sum to 1"),
    ]
    places = (PREVIEW, REFINE, SAMPLER_BY_NAME, SCHEDULER_BY_NAME, SCHEDULER_NODE, SAMPLER_NODE)
    for place in places:
        for problem in problems:
            message = user_message(problem, run(place, steps=20, denoise=0.5, learned_schedule=True, source=source))
            assert message[0].isupper() and message.endswith(".")
            assert "=True" not in message and "python" not in message and "`" not in message and "--" not in message
            if place != SAMPLER_NODE:
                assert "allow_untrained_steps" not in message


def test_problems_carry_their_run_and_are_worded_where_the_user_meets_them():
    with pytest.raises(RunProblem) as raised:
        with problems_of(Run(AUTO, DEFAULT, steps=20)):
            raise UntrainedStepCount("table", 20, range(4, 13))
    assert raised.value.run.steps == 20 and raised.value.run.place == ""  # the runtime words nothing
    with pytest.raises(ValueError, match="^Set steps to 4-12 for the consistency_solver sampler") as error:
        with worded_at(SAMPLER_BY_NAME), problems_of(Run(AUTO, DEFAULT, steps=20)):
            raise UntrainedStepCount("table", 20, range(4, 13))
    assert type(error.value) is ValueError and error.value.__cause__.asked == 20
    with pytest.raises(KeyError):
        with worded_at(SAMPLER_BY_NAME), problems_of(Run(AUTO, DEFAULT)):
            raise KeyError("not ours")
    sampler = worded(SAMPLER_NODE, lambda steps: (_ for _ in ()).throw(RunProblem(UntrainedStepCount("table", steps,
                     range(4, 13)), Run(AUTO, DEFAULT, steps=steps))))  # fmt: skip
    with pytest.raises(ValueError, match="^Give the Consistency Solver Sampler 4-12 steps"):
        sampler(20)


def test_a_saved_schedule_resolves_through_the_node_resolver(tmp_path):
    path = tmp_path / "s.safetensors"
    save_coefficients(path, scheduled_table(), model_family="test-flow")
    source = resolve_coefficients(CoefficientSelection("s"), "flow", {"s": str(path)}.__getitem__)
    torch.testing.assert_close(
        learned_sigmas(source, 8, 1.0, 0.003, 1.0), learned_schedule().sigmas(8, 0.003, 1.0).float()
    )
