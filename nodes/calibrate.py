"""The Consistency Solver Calibrate node: fit coefficients to the user's own model, forward-only, in the graph.

It renders the refine the user will run (ComfyUI's own sampler, scheduler and steps) from seeded noises, fits
previews to land on those finals on most of them, and keeps per step count whichever of the fit, the pack's default
and the stock samplers measured best on the others (``calibration``). The file goes to
``models/consistency_solver/``; its metadata holds the key of the calibration (the model's weights, patches and
sampling, the latent size, the refine and the budget; the prompts only when asked), so a run whose key is already
on disk makes no model call, and ``auto`` everywhere picks the file made for the running model.

Importing this module needs no ComfyUI (``definitions`` lists the node); ``calibration_runtime`` does the sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..calibration import CALIBRATOR_REVISION
from ..solver import parse_step_counts
from . import widgets
from .coefficients import CALIBRATED_FAMILY
from .preview_state import DEFAULT_REFINE_SAMPLER
from .widgets import CATEGORY, COEFFICIENTS_TYPE, REFINE_SCHEDULER

NODE = "Consistency Solver Calibrate"
DEFAULT_STEPS = "5,8"
DEFAULT_BUDGET = 3000
REFINE_STEPS = 30
AUTO_NAME = "auto"  # the file is named after the model's fingerprint: one file per model
EXTRA_PROMPTS = ("positive_2", "positive_3", "positive_4")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def parse_steps(text: str) -> tuple[int, ...]:
    """``"5,8"`` (or ``"5-8"``) -> (5, 8), worded for the node; a preview needs 2 steps or more."""
    try:
        steps = parse_step_counts(text)
    except ValueError:
        steps = ()
    if not steps or steps[0] < 2:
        raise ValueError(
            f"Write the preview step counts of {NODE} as whole numbers from 2 up, separated by commas, e.g. 5,8 "
            f"(it reads {text!r})."
        )
    return steps


@dataclass(frozen=True)
class CalibrationSettings:
    """The node's settings, as stored in the file (the cost knob is the budget)."""

    cfg: float
    steps: tuple[int, ...]
    refine_sampler: str
    refine_scheduler: str
    refine_steps: int
    budget: int
    per_prompt: bool

    def check(self) -> None:
        """What can be refused from the settings alone, before anything runs."""
        if self.refine_steps < max(self.steps):
            raise ValueError(
                f"Give {NODE} at least {max(self.steps)} refine steps, or fewer preview steps: a preview steps "
                f"through the refine's own noise levels."
            )


def calibration_key(model_fingerprint: str, latent_shape: tuple[int, ...], settings: CalibrationSettings,
                    prompts: str | None) -> str:  # fmt: skip
    """What a calibration depends on: the model (weights, LoRAs, sampling), the latent size, the refine, the budget,
    the calibrator's revision, and the prompts only when ``prompts`` (their fingerprint) is given."""
    content = {
        "model": model_fingerprint,
        "latent": list(latent_shape),
        "settings": asdict(settings),
        "calibrator": CALIBRATOR_REVISION,
        "prompts": prompts,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def calibration_file_name(name: str, model_fingerprint: str, prompts: str | None) -> str:
    """The file the node writes: ``name``, or for ``auto`` one named after the model (and the prompts, when the
    calibration follows them), so that every model keeps its own calibration."""
    name = name.strip().removesuffix(".safetensors")
    if name == AUTO_NAME:
        name = f"calibrated-{model_fingerprint[:12]}" + (f"-{prompts[:8]}" if prompts else "")
    if not _NAME.match(name):
        raise ValueError(
            f"Give the file name of {NODE} as a plain name of letters, digits, '.', '_', '-' or spaces, without "
            f"folders, or 'auto' (it reads {name!r})."
        )
    return f"{name}.safetensors"


def stored_key(path: str) -> str | None:
    """The key a calibrated file was made with, or None (no file, or not a calibration)."""
    from ..solver import read_metadata

    if not os.path.isfile(path):
        return None
    return json.loads(read_metadata(path).get("training", "{}")).get("key")


def stored_report(path: str) -> str:
    """The validation table a calibrated file carries, for a run that reuses it."""
    from ..solver import read_metadata

    return json.loads(read_metadata(path).get("training", "{}")).get("report", "")


class ConsistencySolverCalibrate:
    DESCRIPTION = (
        "Fits ConsistencySolver coefficients to this model in minutes, forward passes only: it renders the refine "
        "you will run from seeded noises, fits 5- and 8-step previews to land on them, and checks the fit on noises "
        "it did not see against the stock samplers and the pack's default, keeping whichever measured best. "
        "Calibrate once per model: editing prompts reuses the file without a model call, and 'auto' in every "
        "consistency_solver choice (KSampler by name included) picks it for this model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (COEFFICIENTS_TYPE, "STRING")
    RETURN_NAMES = ("coefficients", "report")
    OUTPUT_TOOLTIPS = (
        "The calibrated coefficients (with their schedule), for Diffusion Preview, the sampler and scheduler nodes.",
        "What the calibration measured on held-out noises: per step count, what the file uses and its RMSE as "
        "ratios to the best stock sampler and to the pack's default.",
    )
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        extra_prompt = (
            "CONDITIONING",
            {"tooltip": "Optional: one more prompt to calibrate on; the noises are spread over the prompts. One "
             "prompt already serves others (on the test models three were no better than one); add prompts when "
             "yours differ widely, in style or subject."},
        )  # fmt: skip
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to calibrate for (with its LoRAs)."}),
                "positive": (
                    "CONDITIONING",
                    {
                        "tooltip": "A prompt to calibrate on. The calibration serves other prompts too: editing it "
                        "does not calibrate again (unless recalibrate_for_each_prompt is on)."
                    },
                ),  # fmt: skip
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt of the calibration runs."}),
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "Its size is the size calibrated for, its batch size how many latents go through "
                        "the model at once (e.g. Empty Latent Image)."
                    },
                ),
                "cfg": widgets.cfg_input(
                    "Prompt strength (classifier-free guidance) of the final render, as in KSampler."
                ),
                "preview_steps": (
                    "STRING",
                    {"default": DEFAULT_STEPS, "tooltip": "The preview step counts to calibrate, e.g. 5,8."},
                ),
                "refine_sampler": (
                    widgets.sampler_names(),
                    {
                        "default": DEFAULT_REFINE_SAMPLER,
                        "tooltip": "The sampler of the final render the previews should match. Samplers that add "
                        "fresh noise every step (ancestral, SDE, lcm, ...) are matched by their noise-free "
                        "counterpart (the same sampler with eta 0, else euler): no preview can foresee that noise. "
                        "dpm_fast and dpm_adaptive choose their own noise levels and are refused.",
                    },
                ),
                "refine_scheduler": (
                    widgets.scheduler_names(),
                    {"default": REFINE_SCHEDULER, "tooltip": "The scheduler of the final render."},
                ),
                "refine_steps": (
                    "INT",
                    {"default": REFINE_STEPS, "min": 2, "max": 1000, "tooltip": "The steps of the final render."},
                ),
                "budget": (
                    "INT",
                    {
                        "default": DEFAULT_BUDGET,
                        "min": 1,
                        "max": 10_000_000,
                        "tooltip": "How many model calls the calibration may spend, the refines included (one call "
                        "= one latent through the model, both CFG halves together): it sets how many noises are "
                        "rendered, three quarters to fit on and a quarter to check the fit on. More is steadier; "
                        "too little is refused before any call, with the minimum named.",
                    },
                ),
                "file_name": (
                    "STRING",
                    {
                        "default": AUTO_NAME,
                        "tooltip": "Saved as models/consistency_solver/<name>.safetensors; 'auto' names it after "
                        "the model, so each model keeps its own calibration.",
                    },
                ),
                "recalibrate_for_each_prompt": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Off (recommended): calibrate once per model; prompt edits reuse the file. On: "
                        "a new prompt calibrates again (costs the whole budget each time).",
                    },
                ),
            },
            "optional": {name: extra_prompt for name in EXTRA_PROMPTS},
        }

    def calibrate(
        self,
        model: Any,
        positive: Any,
        negative: Any,
        latent_image: dict[str, Any],
        cfg: float,
        preview_steps: str,
        refine_sampler: str,
        refine_scheduler: str,
        refine_steps: int,
        budget: int,
        file_name: str,
        recalibrate_for_each_prompt: bool,
        **extra_prompts: Any,
    ) -> dict[str, Any]:
        from . import calibration_runtime

        settings = CalibrationSettings(
            cfg=cfg,
            steps=parse_steps(preview_steps),
            refine_sampler=refine_sampler,
            refine_scheduler=refine_scheduler,
            refine_steps=refine_steps,
            budget=budget,
            per_prompt=recalibrate_for_each_prompt,
        )
        settings.check()
        prompts = [positive, *(extra_prompts[name] for name in EXTRA_PROMPTS if extra_prompts.get(name) is not None)]
        selection, report = calibration_runtime.run_calibration(
            model, prompts, negative, latent_image, settings, file_name
        )
        return {"ui": {"text": [report]}, "result": (selection, report)}


def calibrated_metadata(key: str, model_fingerprint: str, prompts: str, settings: CalibrationSettings,
                        latent_shape: tuple[int, ...], target: str, summary: dict, report: str) -> dict:  # fmt: skip
    """The ``training`` metadata of a calibrated file: what ``auto`` and the cache read, and what was measured."""
    return {
        "key": key,
        "model_fingerprint": model_fingerprint,
        "prompts_fingerprint": prompts,
        "settings": asdict(settings),
        "latent_shape": list(latent_shape),
        "target": target,
        "report": report,
        **summary,
    }


def calibrated_family(kind: str) -> str:
    return f"{CALIBRATED_FAMILY}-{kind}"
