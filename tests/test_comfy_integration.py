"""The pack inside the real ComfyUI runtime (in-process), with tiny models: every stock sampling path."""

from dataclasses import replace
from types import SimpleNamespace

import numpy
import pytest
import torch
from fixtures.comfyui import require_comfyui
from PIL import Image

require_comfyui()

import comfy.k_diffusion.sampling  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from comfy_execution.graph_utils import ExecutionBlocker  # noqa: E402
from comfy_extras import nodes_custom_sampler  # noqa: E402
from fixtures import tiny_models  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's nodes.py, loaded by require_comfyui)
from consistency_solver.nodes import coefficients, register, runtime  # noqa: E402
from consistency_solver.nodes.definitions import (  # noqa: E402
    ConsistencySolverScheduler,
    DiffusionPreview,
    DiffusionRefine,
    SamplerConsistencySolver,
)
from consistency_solver.solver import (  # noqa: E402
    Preset,
    StepSchedule,
    TableCoefficients,
    sample_consistency_solver,
    save_coefficients,
)

torch.set_num_threads(1)
register()
POSITIVE, NEGATIVE = tiny_models.random_conditioning(1), tiny_models.random_conditioning(2)
# A distinctive table: if ComfyUI silently ran euler instead, results would differ.
WEIGHTS = {n: torch.tensor([[1.0, 0.0]] + [[1.7, -0.7]] * (n - 1), dtype=torch.float64) for n in (4, 5, 6, 8)}
# Learned schedules for the same step counts, unlike any stock scheduler (and different from each other).
SCHEDULE = StepSchedule({n: torch.linspace(0, 1, n + 1, dtype=torch.float64)[:-1] ** 0.7 for n in WEIGHTS})
OTHER_SCHEDULE = StepSchedule({n: torch.linspace(0, 0.9, n, dtype=torch.float64) ** 1.5 for n in WEIGHTS})


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """The pack's default files for both families, as engineer D's trainer will ship them."""
    monkeypatch.setattr(coefficients, "BUNDLED_DIR", tmp_path)
    for kind in ("eps", "flow"):
        save_coefficients(tmp_path / f"default-{kind}.safetensors", TableCoefficients(WEIGHTS, 2), model_family="any")
    return tmp_path


@pytest.fixture
def scheduled(tmp_path, monkeypatch):
    """Default files that carry a learned schedule, as the lead's trainer makes with --schedule learned."""
    monkeypatch.setattr(coefficients, "BUNDLED_DIR", tmp_path)
    for kind in ("eps", "flow"):
        table = TableCoefficients(WEIGHTS, 2, schedule=SCHEDULE)
        save_coefficients(tmp_path / f"default-{kind}.safetensors", table, model_family="any")
    return tmp_path


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """models/consistency_solver/ with one file that has a schedule of its own and one that has none."""
    folder = tmp_path / "user"
    save_coefficients(
        folder / "own.safetensors", TableCoefficients(WEIGHTS, 2, schedule=OTHER_SCHEDULE), model_family="any"
    )
    save_coefficients(folder / "plain.safetensors", TableCoefficients(WEIGHTS, 2), model_family="any")
    paths = folder_paths.folder_names_and_paths["consistency_solver"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "consistency_solver", ([str(folder)], paths[1]))


def empty_latent(batch=2, size=8):
    return {"samples": torch.zeros(batch, 4, size, size)}


def ksampler(model, latent, sampler_name, steps=6, seed=5, cfg=4.0, scheduler="karras", denoise=1.0):
    return nodes.KSampler().sample(model, seed, steps, cfg, sampler_name, scheduler, POSITIVE, NEGATIVE, latent,
                                   denoise=denoise)[0]  # fmt: skip


def preview(model, latent, steps=6, seed=5, cfg=4.0, scheduler="karras", denoise=1.0, choice="auto"):
    return DiffusionPreview().preview(model, POSITIVE, NEGATIVE, latent, seed, steps, cfg, scheduler, denoise, choice)


def refine(model, state, steps=6, select="all", sampler=None, cfg=4.0, scheduler="karras"):
    return DiffusionRefine().refine(model, POSITIVE, NEGATIVE, state, True, select, steps, cfg, scheduler, sampler)[0]


def test_registration_is_in_place_and_idempotent():
    register()
    assert comfy.samplers.KSampler.SAMPLERS is comfy.samplers.SAMPLER_NAMES
    assert comfy.samplers.SAMPLER_NAMES.count("consistency_solver") == 1
    assert comfy.samplers.KSAMPLER_NAMES.count("consistency_solver") == 1
    assert "consistency_solver" in nodes.KSampler.INPUT_TYPES()["required"]["sampler_name"][0]
    assert "consistency_solver" in nodes.KSamplerAdvanced.INPUT_TYPES()["required"]["sampler_name"][0]
    assert "consistency_solver" in nodes_custom_sampler.KSamplerSelect.INPUT_TYPES()["required"]["sampler_name"][0]
    assert comfy.k_diffusion.sampling.sample_consistency_solver.__wrapped__ is runtime.sample_consistency_solver
    paths, extensions = folder_paths.folder_names_and_paths["consistency_solver"]
    assert extensions == {".safetensors"} and paths.count(str(coefficients.BUNDLED_DIR)) == 1


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_ksampler_by_name_runs_the_solver_with_the_default_file(kind, bundled, monkeypatch):
    """Exact Gaussian model: KSampler's result equals the solver called directly on the same start."""
    calls = []
    monkeypatch.setattr(runtime, "solver_sample", lambda *a, **k: calls.append(k) or sample_consistency_solver(*a, **k))
    model = tiny_models.gaussian_model(kind)
    out = ksampler(model, empty_latent(), "consistency_solver")["samples"]
    assert len(calls) == 1 and calls[0]["coefficients"].tables[6][1, 0] == 1.7
    assert calls[0]["model_sampling"] is model.get_model_object("model_sampling")

    model_sampling = model.get_model_object("model_sampling")
    sigmas = runtime.ksampler_sigmas(model, 6, "karras", 1.0)
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 8, 8), 5)
    start = model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)

    def denoiser(x, sigma):
        return tiny_models.exact_denoised(x, sigma.view(-1, 1, 1, 1), kind, 0.3, 0.8)

    direct = sample_consistency_solver(denoiser, start, sigmas, coefficients=TableCoefficients(WEIGHTS, 2))
    torch.testing.assert_close(model.model.process_latent_in(out), direct, atol=1e-5, rtol=1e-5)


def test_without_the_default_file_ksampler_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(coefficients, "BUNDLED_DIR", tmp_path)
    with pytest.raises(ValueError, match="^Reinstall the ConsistencySolver node pack.*default-eps.safetensors"):
        ksampler(tiny_models.gaussian_model("eps"), empty_latent(), "consistency_solver")


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_preview_and_refine_share_noise_and_refine_equals_stock_ksampler(kind, bundled):
    model = tiny_models.tiny_unet_model(kind)
    latent = empty_latent()
    preview_latent, state = preview(model, latent)
    assert torch.equal(state.noise, comfy.sample.prepare_noise(latent["samples"], 5))
    # The preview is exactly KSampler with consistency_solver (same noise, sigmas and coefficients).
    assert torch.equal(preview_latent["samples"], ksampler(model, latent, "consistency_solver")["samples"])
    assert torch.equal(refine(model, state, steps=8)["samples"], ksampler(model, latent, "dpmpp_2m", 8)["samples"])
    euler = nodes_custom_sampler.KSamplerSelect().get_sampler("euler")[0]
    assert torch.equal(refine(model, state, sampler=euler)["samples"], ksampler(model, latent, "euler")["samples"])


def test_refine_selects_previews_from_a_batch(bundled):
    model = tiny_models.tiny_unet_model("eps")
    latent = empty_latent(batch=3)
    _, state = preview(model, latent)
    picked = refine(model, state, select="0,2")["samples"]
    full = ksampler(model, latent, "dpmpp_2m")["samples"]
    torch.testing.assert_close(picked, full[[0, 2]], atol=1e-5, rtol=1e-4)


def test_denoise_below_one_and_an_inpainting_mask(bundled):
    model = tiny_models.tiny_unet_model("eps")
    source = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    for latent in ({"samples": source}, {"samples": source, "noise_mask": mask}):
        preview_latent, state = preview(model, latent, denoise=0.6)
        assert state.sigmas[0] < model.get_model_object("model_sampling").sigma_max  # img2img starts lower
        assert torch.isfinite(preview_latent["samples"]).all()
        stock = ksampler(model, latent, "dpmpp_2m", denoise=0.6)
        assert torch.equal(refine(model, state)["samples"], stock["samples"])
    # Outside the mask the source latent is kept, as with every stock sampler.
    torch.testing.assert_close(preview_latent["samples"][..., 0, :], source[..., 0, :])


def test_a_five_dimensional_latent(bundled):
    model = tiny_models.gaussian_model("flow", latent_format=tiny_models.video_latent_format())
    latent = {"samples": torch.zeros(1, 16, 3, 4, 4)}
    preview_latent, state = preview(model, latent)
    assert preview_latent["samples"].shape == (1, 16, 3, 4, 4) and state.noise.shape == (1, 16, 3, 4, 4)
    assert torch.equal(refine(model, state)["samples"], ksampler(model, latent, "dpmpp_2m")["samples"])


def test_ksampler_advanced_and_sampler_custom_advanced(bundled):
    model = tiny_models.tiny_unet_model("eps")
    latent = empty_latent()
    advanced = nodes.KSamplerAdvanced().sample(
        model, "enable", 5, 8, 4.0, "consistency_solver", "karras", POSITIVE, NEGATIVE, latent, 2, 6, "disable"
    )[0]["samples"]
    assert torch.isfinite(advanced).all()
    sampler = SamplerConsistencySolver().get_sampler("ab2", "as stored in the file", False)[0]
    guider = nodes_custom_sampler.CFGGuider().get_guider(model, POSITIVE, NEGATIVE, 4.0)[0]
    sigmas = nodes_custom_sampler.BasicScheduler().get_sigmas(model, "karras", 6, 1.0)[0]
    noise = nodes_custom_sampler.RandomNoise().get_noise(5)[0]
    custom = nodes_custom_sampler.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]
    model_sampling = model.get_model_object("model_sampling")
    ab2 = runtime.consistency_sampler(runtime.CoefficientSelection("ab2"))
    direct = comfy.sample.sample_custom(
        model, noise.generate_noise(latent), 4.0, ab2, sigmas, POSITIVE, NEGATIVE, latent["samples"], seed=5,
    )  # fmt: skip
    assert torch.equal(custom, direct) and model_sampling is not None
    ab2_run = runtime.resolved(model_sampling, runtime.CoefficientSelection("ab2"), model)
    assert isinstance(ab2_run.source, Preset)


def test_progress_is_reported_every_step(bundled):
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        preview(tiny_models.tiny_unet_model("eps"), empty_latent(), steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert updates == [(i, 5) for i in range(1, 6)]


def test_refine_blocks_until_approved_and_refuses_a_foreign_state(bundled):
    eps_model = tiny_models.tiny_unet_model("eps")
    _, state = preview(eps_model, empty_latent())
    (blocked,) = DiffusionRefine().refine(eps_model, POSITIVE, NEGATIVE, state, False, "all", 30, 4.0, "karras")
    assert isinstance(blocked, ExecutionBlocker) and blocked.message is None
    with pytest.raises(ValueError, match="different model sampling"):
        refine(tiny_models.tiny_unet_model("flow"), state)
    with pytest.raises(ValueError, match=r"different model sampling .*SD15\).*Wan21"):
        refine(tiny_models.gaussian_model("eps", latent_format=tiny_models.video_latent_format()), state)


def test_a_file_for_eps_models_is_refused_for_a_flow_model(tmp_path, monkeypatch):
    save_coefficients(tmp_path / "sd15.safetensors", TableCoefficients(WEIGHTS, 2), model_family="sd15-eps")
    paths = folder_paths.folder_names_and_paths["consistency_solver"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "consistency_solver", ([str(tmp_path)], paths[1]))
    with pytest.raises(ValueError, match="^Choose coefficients made for flow models .* in Diffusion Preview"):
        preview(tiny_models.gaussian_model("flow"), empty_latent(), choice="sd15.safetensors")
    preview_latent, _ = preview(tiny_models.gaussian_model("eps"), empty_latent(), choice="sd15.safetensors")
    assert torch.isfinite(preview_latent["samples"]).all()


def scheduler_node(model, steps=6, denoise=1.0, choice="auto"):
    return ConsistencySolverScheduler().get_sigmas(model, steps, denoise, choice)[0]


def sampler_custom(model, latent, sampler, sigmas, seed=5, cfg=4.0):
    return nodes_custom_sampler.SamplerCustom().sample(
        model, True, seed, cfg, POSITIVE, NEGATIVE, sampler, sigmas, latent
    )[0]["samples"]


def test_the_scheduler_is_registered_in_place_and_idempotently():
    register()
    assert comfy.samplers.KSampler.SCHEDULERS is comfy.samplers.SCHEDULER_NAMES
    assert comfy.samplers.SCHEDULER_NAMES.count("consistency_solver") == 1
    handler = comfy.samplers.SCHEDULER_HANDLERS["consistency_solver"]
    assert handler.handler.__wrapped__ is runtime.consistency_solver_scheduler and handler.use_ms
    assert "consistency_solver" in nodes.KSampler.INPUT_TYPES()["required"]["scheduler"][0]
    assert "consistency_solver" in nodes.KSamplerAdvanced.INPUT_TYPES()["required"]["scheduler"][0]
    assert "consistency_solver" in nodes_custom_sampler.BasicScheduler.INPUT_TYPES()["required"]["scheduler"][0]
    assert "consistency_solver" in DiffusionPreview.INPUT_TYPES()["required"]["scheduler"][0]


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_the_scheduler_gives_the_learned_schedule_over_the_model_range(kind, scheduled):
    model = tiny_models.tiny_unet_model(kind)
    model_sampling = model.get_model_object("model_sampling")
    sigma_min, sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    expected = SCHEDULE.sigmas(6, sigma_min, sigma_max).float()
    sigmas = scheduler_node(model)
    torch.testing.assert_close(sigmas, expected)
    assert sigmas[0] == pytest.approx(sigma_max) and sigmas[-1] == 0.0
    # By name, through ComfyUI's own BasicScheduler and calculate_sigmas: the same.
    basic = nodes_custom_sampler.BasicScheduler().get_sigmas(model, "consistency_solver", 6, 1.0)[0]
    assert torch.equal(basic, sigmas)


def test_ksampler_with_both_names_equals_sampler_custom_with_the_scheduler_node(scheduled):
    model = tiny_models.tiny_unet_model("eps")
    latent = empty_latent()
    stock = nodes.KSampler().sample(
        model, 5, 6, 4.0, "consistency_solver", "consistency_solver", POSITIVE, NEGATIVE, latent
    )[0]["samples"]
    sampler = SamplerConsistencySolver().get_sampler("auto", "as stored in the file", False)[0]
    custom = sampler_custom(model, latent, sampler, scheduler_node(model))
    assert torch.equal(stock, custom)
    assert not torch.equal(stock, ksampler(model, latent, "consistency_solver", scheduler="karras")["samples"])


def test_denoise_below_one_uses_the_longer_trained_schedule(scheduled):
    model = tiny_models.tiny_unet_model("eps")
    model_sampling = model.get_model_object("model_sampling")
    sigmas = scheduler_node(model, steps=4, denoise=0.5)  # 8 steps in all, the last 4 run
    expected = SCHEDULE.sigmas(8, float(model_sampling.sigma_min), float(model_sampling.sigma_max))[-5:]
    torch.testing.assert_close(sigmas, expected.float())
    basic = nodes_custom_sampler.BasicScheduler().get_sigmas(model, "consistency_solver", 4, 0.5)[0]
    assert torch.equal(basic, sigmas)
    source = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    stock = ksampler(model, source, "consistency_solver", steps=4, scheduler="consistency_solver", denoise=0.5)
    sampler = SamplerConsistencySolver().get_sampler("auto", "as stored in the file", False)[0]
    assert torch.equal(stock["samples"], sampler_custom(model, source, sampler, sigmas))
    assert scheduler_node(model, steps=4, denoise=0.0).numel() == 0
    with pytest.raises(
        ValueError, match=r"^Set steps to 2-4 in Consistency Solver Scheduler.*not 12 \(steps / denoise"
    ):
        scheduler_node(model, steps=6, denoise=0.5)


def test_the_scheduler_without_a_learned_schedule_or_for_an_untrained_count_names_the_fix(bundled, user_files):
    model = tiny_models.tiny_unet_model("eps")
    with pytest.raises(ValueError, match=r"^Pick another scheduler than consistency_solver: the pack's default"):
        ksampler(model, empty_latent(), "euler", scheduler="consistency_solver")
    with pytest.raises(ValueError, match=r"^Choose coefficients that carry a learned schedule.*'plain.safetensors'"):
        scheduler_node(model, choice="plain.safetensors")
    with pytest.raises(ValueError, match=r"BasicScheduler: the preset 'ab2 \(untrained\)' carries no learned schedule"):
        scheduler_node(model, choice="ab2")
    with pytest.raises(ValueError, match=r"^Set steps to 4, 5, 6, 8 in .*'own.safetensors', which covers 4, 5, 6, 8"):
        scheduler_node(model, steps=7, choice="own.safetensors")


def test_ksampler_by_name_names_its_own_step_counting(scheduled):
    model = tiny_models.tiny_unet_model("eps")
    # uni_pc makes KSampler ask the scheduler for one step more: 7, which the file has no schedule for.
    with pytest.raises(
        ValueError,
        match=r"^Set steps so that the consistency_solver scheduler is asked for 4, 5, 6, 8 steps.*asks for 7\. "
        r"Below denoise 1 a run asks for steps / denoise.*uni_pc, uni_pc_bh2 ask for one step more\.$",
    ):
        ksampler(model, empty_latent(), "uni_pc", scheduler="consistency_solver")


def test_a_chosen_file_brings_its_own_schedule_to_the_scheduler_node_and_the_preview(scheduled, user_files):
    model = tiny_models.tiny_unet_model("eps")
    model_sampling = model.get_model_object("model_sampling")
    own = OTHER_SCHEDULE.sigmas(6, float(model_sampling.sigma_min), float(model_sampling.sigma_max)).float()
    torch.testing.assert_close(scheduler_node(model, choice="own.safetensors"), own)
    loaded = coefficients.CoefficientSelection("own.safetensors")
    torch.testing.assert_close(ConsistencySolverScheduler().get_sigmas(model, 6, 1.0, "auto", loaded)[0], own)
    _, state = preview(model, empty_latent(), scheduler="consistency_solver", choice="own.safetensors")
    torch.testing.assert_close(state.sigmas, own)


def test_refine_after_a_preview_on_the_learned_schedule(scheduled, user_files):
    model = tiny_models.tiny_unet_model("eps")
    latent = empty_latent()
    preview_latent, state = preview(model, latent, scheduler="consistency_solver")
    # Preview == KSampler with both names: same noise, same learned sigmas, same coefficients.
    both = ksampler(model, latent, "consistency_solver", scheduler="consistency_solver")["samples"]
    assert torch.equal(preview_latent["samples"], both)
    # The refine has its own scheduler: 30 steps of karras render exactly what the stock KSampler renders.
    assert torch.equal(refine(model, state, steps=30)["samples"], ksampler(model, latent, "dpmpp_2m", 30)["samples"])
    # consistency_solver in the refine: the preview's file's schedule, for a step count it was trained for only.
    with pytest.raises(ValueError, match=r"^Set steps to 4, 5, 6, 8 in Diffusion Refine, or pick a stock scheduler"):
        refine(model, state, steps=30, scheduler="consistency_solver")
    _, own_state = preview(model, latent, scheduler="karras", choice="own.safetensors")
    euler = nodes_custom_sampler.KSamplerSelect().get_sampler("euler")[0]
    refined = refine(model, own_state, steps=8, sampler=euler, scheduler="consistency_solver")["samples"]
    assert torch.equal(
        refined, sampler_custom(model, latent, euler, scheduler_node(model, 8, choice="own.safetensors"))
    )


def test_refine_with_a_mask_without_a_batch_and_a_partial_select_equals_the_stock_ksampler(bundled):
    """B5: an (H, W) mask is one mask for every image, as in ComfyUI; selecting previews must not slice it."""
    model = tiny_models.tiny_unet_model("eps")
    source = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(8, 8)
    mask[2:6, 1:7] = 1.0
    latent = {"samples": source, "noise_mask": mask}
    _, state = preview(model, latent, denoise=0.6)
    stock = ksampler(model, latent, "dpmpp_2m", denoise=0.6)["samples"]
    torch.testing.assert_close(refine(model, state, select="0,2")["samples"], stock[[0, 2]], atol=1e-5, rtol=1e-4)


def counting_model_calls(model, monkeypatch):
    calls = []
    inner = model.model.apply_model
    monkeypatch.setattr(model.model, "apply_model", lambda *a, **k: calls.append(1) or inner(*a, **k))
    return calls


def test_a_vae_shows_the_previews_without_a_model_call_or_a_change_to_the_outputs(bundled, monkeypatch, tmp_path):
    """Issue 23: with a VAE, Diffusion Preview decodes its previews for the pick grid, captioned with the seed and the
    batch size; the latent, the state and the model calls are those of a preview without one."""
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    model = tiny_models.tiny_unet_model("eps")
    calls = counting_model_calls(model, monkeypatch)
    latent = empty_latent(batch=3)
    plain, plain_state = preview(model, latent, seed=7)
    calls_without_vae = len(calls)
    vae = tiny_models.FashionVAE()
    shown = DiffusionPreview().preview(model, POSITIVE, NEGATIVE, latent, 7, 6, 4.0, "karras", 1.0, "auto", vae=vae)
    assert len(calls) == 2 * calls_without_vae
    decoded, state = shown["result"]
    assert torch.equal(decoded["samples"], plain["samples"])
    for field in ("noise", "sigmas"):
        assert torch.equal(getattr(state, field), getattr(plain_state, field)), field
    assert replace(state, noise=None, sigmas=None, latent=None) == replace(plain_state, noise=None, sigmas=None,
                                                                           latent=None)  # fmt: skip
    ui = shown["ui"]
    assert ui[runtime.PICKS_UI_KEY] == [{"seed": 7, "batch_size": 3}]
    assert [image["type"] for image in ui["images"]] == ["temp"] * 3
    expected = (vae.decode(decoded["samples"]) * 255).clamp(0, 255).to(torch.uint8)
    for image, pixels in zip(ui["images"], expected, strict=True):
        saved = numpy.asarray(Image.open(tmp_path / image["subfolder"] / image["filename"]))
        assert torch.equal(torch.from_numpy(saved.copy()), pixels), image


def test_a_video_vae_shows_every_frame(bundled, monkeypatch, tmp_path):
    """A video VAE decodes [B, T, H, W, 3]: every frame is shown, as VAE Decode flattens them; the batch size stays
    that of the previews (so the pick grid knows the frames are not one preview each)."""
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    model = tiny_models.gaussian_model("flow", latent_format=tiny_models.video_latent_format())
    latent = {"samples": torch.zeros(2, 16, 3, 4, 4)}
    preview_latent, state = preview(model, latent)
    video_vae = SimpleNamespace(decode=lambda samples: torch.rand(samples.shape[0], samples.shape[2], 8, 8, 3))
    ui = runtime.preview_images(video_vae, preview_latent, state)
    assert len(ui["images"]) == 6 and ui[runtime.PICKS_UI_KEY] == [{"seed": 5, "batch_size": 2}]


def test_ksampler_and_the_preview_refuse_an_untrained_step_count_before_any_model_call(scheduled, monkeypatch):
    """U1: at denoise 0.3 the learned schedule (3 / 0.3 = 10 steps) fits, the weights (3 steps) do not."""
    model = tiny_models.tiny_unet_model("eps")
    calls = counting_model_calls(model, monkeypatch)
    source = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    with pytest.raises(ValueError) as by_name:
        ksampler(model, source, "consistency_solver", steps=3, scheduler="consistency_solver", denoise=0.5)
    assert str(by_name.value).startswith("Set steps to 4, 5, 6, 8 for the consistency_solver sampler")
    with pytest.raises(ValueError) as in_preview:
        preview(model, source, steps=3, scheduler="consistency_solver", denoise=0.5)
    assert str(in_preview.value) == (
        "Set steps to 4 in Diffusion Preview, or pick a stock scheduler and set steps to 4, 5, 6, 8: the pack's "
        "default coefficient file default-eps.safetensors was trained for 4, 5, 6, 8 steps, not 3, and at denoise "
        "0.5 the learned schedule needs steps / denoise within 4, 5, 6, 8."
    )
    with pytest.raises(ValueError, match=r"^Pick a stock scheduler .* in Diffusion Preview.*'ab2 \(untrained\)'"):
        preview(model, source, scheduler="consistency_solver", choice="ab2")
    assert calls == []
    preview(model, source, steps=4, scheduler="consistency_solver", denoise=0.5)  # 8 steps in all, 4 run
    assert len(calls) == 4  # cond and uncond in one batch per step


def test_the_sampler_node_words_its_problems_for_itself(bundled):
    model = tiny_models.tiny_unet_model("eps")
    sampler = SamplerConsistencySolver().get_sampler("auto", "as stored in the file", False)[0]
    sigmas = nodes_custom_sampler.BasicScheduler().get_sigmas(model, "karras", 7, 1.0)[0]
    with pytest.raises(ValueError, match=r"^Give the Consistency Solver Sampler 4, 5, 6, 8 steps .*not 7\.$"):
        sampler_custom(model, empty_latent(), sampler, sigmas)
