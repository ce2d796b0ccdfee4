"""The node classes (ComfyUI's V1 schema). Declarations only; the work happens in ``runtime``.

Importing this module needs no ComfyUI: the two live lists (schedulers, coefficient files) are read
when ComfyUI asks for INPUT_TYPES, and ``runtime`` is imported when a node runs.
"""

from __future__ import annotations

from typing import Any

from . import widgets
from .calibrate import ConsistencySolverCalibrate
from .coefficients import (
    INFERENCE_MODE_CHOICES,
    SCHEDULER_NAME,
    STORED_MODE,
    CoefficientSelection,
    choice_from_widget,
    coefficient_choices,
    file_fingerprint,
    is_coefficient_choice,
)
from .messages import PREVIEW, REFINE, SAMPLER_NODE, SCHEDULER_NODE, worded, worded_at
from .preview_state import DEFAULT_REFINE_SAMPLER, SELECT_ALL, PreviewRequest, RefineRequest
from .widgets import CATEGORY, COEFFICIENTS_TYPE, PREVIEW_STATE_TYPE, REFINE_SCHEDULER, SCHEDULER_CATEGORY, SEED_MAX

# The preview runs on the schedule learned with its coefficients (the bundled defaults carry one): on the
# stock schedules the learned weights lose much of their consistency. The refine keeps a stock schedule.
PREVIEW_SCHEDULER = SCHEDULER_NAME
# The most steps any shipped or converted coefficients run (the pack's defaults 4-12, the paper's SD1.5 policy
# 2-15): a preview is a few-step draft, and its coefficients refuse other counts anyway.
PREVIEW_STEPS_MAX = 15
SCHEDULE_STEPS_MAX = 100  # learned schedules are for few-step runs


def _runtime():
    from . import runtime

    return runtime


def _coefficient_widget() -> tuple[list[str], dict[str, Any]]:
    return (
        coefficient_choices(widgets.coefficient_file_names()),
        {
            "default": "auto",
            "tooltip": "Which solver coefficients to use. 'auto' = the pack's trained default for this kind of "
            "model (SD1.5/SDXL-type, or flow models such as SD3 and Flux). Files come from "
            "models/consistency_solver/; the entries marked untrained (euler, ab2-ab4, ipndm) are classic solvers, "
            "for comparison.",
        },
    )


def _selection_widgets() -> dict[str, tuple]:
    return {
        "coefficients": _coefficient_widget(),
        "inference_mode": (
            list(INFERENCE_MODE_CHOICES),
            {
                "default": STORED_MODE,
                "tooltip": "How trained coefficients pick their weights: 'mode' = the most likely ones, "
                "'expectation' = their average. Leave it as stored unless you compare the two.",
            },
        ),
        "allow_untrained_steps": (
            "BOOLEAN",
            {
                "default": False,
                "tooltip": "Trained coefficients refuse step counts they were not trained for. Turn on to run "
                "them anyway (quality is then unknown); files holding fixed weights per step count still refuse.",
            },
        ),
    }


def _loaded_coefficients_input() -> dict[str, tuple]:
    return {
        "loaded_coefficients": (
            COEFFICIENTS_TYPE,
            {"tooltip": "Optional: coefficients from a Consistency Solver Coefficients node (wins over this choice)."},
        )
    }


def _model_inputs() -> dict[str, tuple]:
    return {
        "model": ("MODEL", {"tooltip": "The diffusion model (SD1.5, SDXL, SD3, Flux, ...)."}),
        "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
        "negative": ("CONDITIONING", {"tooltip": "What the image should avoid."}),
    }


def _scheduler_input(default: str, tooltip: str) -> tuple[list[str], dict[str, Any]]:
    return (widgets.scheduler_names(), {"default": default, "tooltip": tooltip})


def _selection(coefficients: str, inference_mode: str, allow_untrained_steps: bool, loaded: Any) -> Any:
    if loaded is not None:
        return loaded
    return CoefficientSelection(choice_from_widget(coefficients), inference_mode, allow_untrained_steps)


def _validate_coefficients(cls: type, coefficients: str) -> bool | str:
    """ComfyUI's VALIDATE_INPUTS: the listed choices, and the bare preset names of workflows saved before the
    untrained mark (declaring ``coefficients`` here replaces ComfyUI's own is-it-in-the-list check)."""
    if is_coefficient_choice(coefficients, widgets.coefficient_file_names()):
        return True
    return (
        f"Pick another coefficients entry: '{coefficients}' is not in the list (coefficient files go in "
        "models/consistency_solver/)"
    )


class ConsistencySolverCoefficients:
    DESCRIPTION = "Chooses ConsistencySolver coefficients once, for several Preview or sampler nodes."
    CATEGORY = CATEGORY
    RETURN_TYPES = (COEFFICIENTS_TYPE,)
    RETURN_NAMES = ("coefficients",)
    OUTPUT_TOOLTIPS = ("The chosen coefficients, checked against the model when sampling starts.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": _selection_widgets(),
            "optional": {
                "model": (
                    "MODEL",
                    {
                        "tooltip": "Optional: the model the coefficients are for. Connected, the node shows which file "
                        "'auto' uses for it (the file calibrated for this model, or the pack's default)."
                    },
                )  # fmt: skip
            },
        }

    @classmethod
    def IS_CHANGED(cls, coefficients: str, **_: Any) -> str:
        return file_fingerprint(choice_from_widget(coefficients), _runtime().locate_file)

    VALIDATE_INPUTS = classmethod(_validate_coefficients)

    def load(
        self, coefficients: str, inference_mode: str, allow_untrained_steps: bool, model: Any = None
    ) -> dict[str, Any]:
        selection = _selection(coefficients, inference_mode, allow_untrained_steps, None)
        shown = [] if model is None else [_runtime().describe_for(model, selection)]
        return {"ui": {"text": shown}, "result": (selection,)}


class SamplerConsistencySolver:
    DESCRIPTION = "The ConsistencySolver as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A sampler that runs ConsistencySolver with the chosen coefficients.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": _selection_widgets(), "optional": _loaded_coefficients_input()}

    IS_CHANGED = ConsistencySolverCoefficients.IS_CHANGED
    VALIDATE_INPUTS = ConsistencySolverCoefficients.VALIDATE_INPUTS

    def get_sampler(
        self, coefficients: str, inference_mode: str, allow_untrained_steps: bool, loaded_coefficients: Any = None
    ) -> tuple[Any]:
        selection = _selection(coefficients, inference_mode, allow_untrained_steps, loaded_coefficients)
        sampler = _runtime().consistency_sampler(selection)
        sampler.sampler_function = worded(SAMPLER_NODE, sampler.sampler_function)  # it runs in SamplerCustom
        return (sampler,)


class ConsistencySolverScheduler:
    DESCRIPTION = (
        "Noise levels (SIGMAS) from the schedule learned together with ConsistencySolver coefficients: the "
        f"'{SCHEDULER_NAME}' scheduler with a coefficient choice. It needs coefficients that carry a learned "
        "schedule (the pack's defaults do, for 4-12 steps) and one of the step counts they were trained for."
    )
    CATEGORY = SCHEDULER_CATEGORY
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The learned noise levels, placed in this model's range and ending at 0.",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "The diffusion model: the schedule is placed in its range of noise levels."},
                ),
                "steps": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": SCHEDULE_STEPS_MAX,
                        "tooltip": "Sampling steps: a count the coefficients were trained for (4-12 for the pack's "
                        "defaults). Below denoise 1 the longer schedule must be one of them: 8 steps at denoise 0.5 "
                        "run the last 8 of the 16-step schedule.",
                    },
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "As in BasicScheduler: below 1 (image-to-image), only the last 'steps' steps of a "
                        "longer schedule run.",
                    },
                ),
                "coefficients": _coefficient_widget(),
            },
            "optional": _loaded_coefficients_input(),
        }

    IS_CHANGED = ConsistencySolverCoefficients.IS_CHANGED
    VALIDATE_INPUTS = ConsistencySolverCoefficients.VALIDATE_INPUTS

    def get_sigmas(
        self, model: Any, steps: int, denoise: float, coefficients: str, loaded_coefficients: Any = None
    ) -> tuple[Any]:
        selection = _selection(coefficients, STORED_MODE, False, loaded_coefficients)
        with worded_at(SCHEDULER_NODE):
            return (_runtime().scheduler_node_sigmas(model, steps, denoise, selection),)


class DiffusionPreview:
    DESCRIPTION = (
        "A fast few-step draft of exactly the image Diffusion Refine (or a KSampler with the same seed) renders: "
        "same noise, same start, a solver trained to land where the full run lands. With a VAE connected it shows "
        "its previews, and you click the ones the Refine renders."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", PREVIEW_STATE_TYPE)
    RETURN_NAMES = ("preview", "preview_state")
    OUTPUT_TOOLTIPS = (
        "The preview latent (decode it with VAE Decode to look at it).",
        "Seed, noise and settings of this preview, for Diffusion Refine.",
    )
    FUNCTION = "preview"
    # It shows its previews when a VAE is connected, so it runs without a Save or Preview Image after it.
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                **_model_inputs(),
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "The latent to start from (Empty Latent Image for text-to-image); a batch gives "
                        "one preview per image."
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": SEED_MAX,
                        "control_after_generate": True,
                        "tooltip": "The noise seed; Diffusion Refine renders the same noise. The seed shown is "
                        "the one of the preview on screen: a new one is drawn at the start of the next run, and "
                        "never while the Refine's approve is on.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": PREVIEW_STEPS_MAX,
                        "tooltip": "Preview steps: fewer is faster. The pack's coefficients are trained for 4-12 "
                        "(8 is a good start); another file names its own counts if it refuses one.",
                    },
                ),
                "cfg": widgets.cfg_input(),
                "scheduler": _scheduler_input(
                    PREVIEW_SCHEDULER,
                    "How the noise levels are spaced over the preview steps. consistency_solver (default): the "
                    "schedule learned with the chosen coefficients ('auto' has one for 4-12 steps). The presets and "
                    "files without a learned schedule need a stock scheduler such as simple or karras.",
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.01,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How much of the input latent to repaint (below 1 for image-to-image). "
                        "The refine uses the same value.",
                    },
                ),
                "coefficients": _coefficient_widget(),
            },
            "optional": {
                **_loaded_coefficients_input(),
                "vae": (
                    "VAE",
                    {
                        "tooltip": "Optional: shows the previews on this node, each with its seed and batch "
                        "position; click the ones Diffusion Refine should render (its select shows them). One VAE "
                        "decode per preview run, no model call."
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, coefficients: str, **_: Any) -> str:
        return ConsistencySolverCoefficients.IS_CHANGED(coefficients)

    VALIDATE_INPUTS = ConsistencySolverCoefficients.VALIDATE_INPUTS

    def preview(
        self,
        model: Any,
        positive: Any,
        negative: Any,
        latent_image: dict[str, Any],
        seed: int,
        steps: int,
        cfg: float,
        scheduler: str,
        denoise: float,
        coefficients: str,
        loaded_coefficients: Any = None,
        vae: Any = None,
    ) -> tuple[dict[str, Any], Any] | dict[str, Any]:
        selection = _selection(coefficients, STORED_MODE, False, loaded_coefficients)
        request = PreviewRequest(seed, steps, cfg, scheduler, denoise, selection)
        runtime = _runtime()
        with worded_at(PREVIEW):
            preview, state = runtime.run_preview(model, positive, negative, latent_image, request)
        if vae is None:
            return preview, state
        return {"ui": runtime.preview_images(vae, preview, state), "result": (preview, state)}


class DiffusionRefine:
    DESCRIPTION = (
        "The full render of a preview: the same noise, many steps of a strong sampler. While 'approve' is off it "
        "does nothing, so you can iterate on previews for free."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The refined latent, equal to a stock KSampler run with the preview's seed and noise.",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                **_model_inputs(),
                "preview_state": (
                    PREVIEW_STATE_TYPE,
                    {"tooltip": "From Diffusion Preview: its seed, noise, latent and denoise."},
                ),
                "approve": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "label_on": "render",
                        "label_off": "previews only",
                        "tooltip": "Off: skip the refine (and everything after it). On: render the chosen previews.",
                    },
                ),
                "select": (
                    "STRING",
                    {
                        "default": SELECT_ALL,
                        "tooltip": "Which previews of the batch to refine: 'all', or positions such as '0,2' "
                        "(counting from 0). With a VAE on Diffusion Preview, click the previews there instead: "
                        "this shows the ones you picked, and a saved workflow keeps them.",
                    },
                ),
                "steps": ("INT", {"default": 30, "min": 1, "max": 10000, "tooltip": "Steps of the full render."}),
                "cfg": widgets.cfg_input(),
                "scheduler": _scheduler_input(
                    REFINE_SCHEDULER,
                    "How the noise levels are spaced over the refine steps, whatever the preview used. Keep a stock "
                    "one (simple, karras, ...) for 30 steps: consistency_solver works only for the step counts the "
                    "preview's coefficients have a learned schedule for.",
                ),
            },
            "optional": {
                "sampler": (
                    "SAMPLER",
                    {"tooltip": f"Optional sampler (e.g. from KSamplerSelect); without it: {DEFAULT_REFINE_SAMPLER}."},
                ),
            },
        }

    def refine(
        self,
        model: Any,
        positive: Any,
        negative: Any,
        preview_state: Any,
        approve: bool,
        select: str,
        steps: int,
        cfg: float,
        scheduler: str,
        sampler: Any = None,
    ) -> tuple[Any]:
        if not approve:
            from comfy_execution.graph_utils import ExecutionBlocker

            # Blocks everything downstream without an error; the preview stays cached for when it is approved.
            return (ExecutionBlocker(None),)
        request = RefineRequest(select, steps, cfg, scheduler, sampler)
        with worded_at(REFINE):
            return (_runtime().run_refine(model, positive, negative, preview_state, request),)


NODE_CLASS_MAPPINGS = {
    "ConsistencySolverCoefficients": ConsistencySolverCoefficients,
    "SamplerConsistencySolver": SamplerConsistencySolver,
    "DiffusionPreview": DiffusionPreview,
    "DiffusionRefine": DiffusionRefine,
    "ConsistencySolverScheduler": ConsistencySolverScheduler,
    "ConsistencySolverCalibrate": ConsistencySolverCalibrate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConsistencySolverCoefficients": "Consistency Solver Coefficients",
    "SamplerConsistencySolver": "Consistency Solver Sampler",
    # "Consistency Solver" in every name: the node search matches names and display names, not categories.
    "DiffusionPreview": "Diffusion Preview (Consistency Solver)",
    "DiffusionRefine": "Diffusion Refine (Consistency Solver)",
    "ConsistencySolverScheduler": "Consistency Solver Scheduler",
    "ConsistencySolverCalibrate": "Consistency Solver Calibrate",
}
