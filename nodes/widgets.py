"""What every node of the pack declares alike: its category, its link types, and the live lists ComfyUI fills.

The lists are read when ComfyUI asks a node for INPUT_TYPES, so importing this module needs no ComfyUI.
"""

from __future__ import annotations

from typing import Any

from .coefficients import FOLDER_NAME

CATEGORY = "sampling/consistency_solver"
SCHEDULER_CATEGORY = "sampling/custom_sampling/schedulers"  # beside BasicScheduler and KarrasScheduler
COEFFICIENTS_TYPE = "CONSISTENCY_COEFFICIENTS"
PREVIEW_STATE_TYPE = "PREVIEW_STATE"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
REFINE_SCHEDULER = "simple"  # the final render's scheduler by default (Diffusion Refine, and what Calibrate matches)


def sampler_names() -> list[str]:
    import comfy.samplers

    return comfy.samplers.KSampler.SAMPLERS


def scheduler_names() -> list[str]:
    import comfy.samplers

    return comfy.samplers.KSampler.SCHEDULERS


def coefficient_file_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(FOLDER_NAME)


def cfg_input(
    tooltip: str = "Prompt strength (classifier-free guidance), as in KSampler.",
) -> tuple[str, dict[str, Any]]:
    return ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": tooltip})
