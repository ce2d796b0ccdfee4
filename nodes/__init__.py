"""ComfyUI glue. Importable without ComfyUI: only ``register()`` and running a node touch ``comfy``."""

from .definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def register() -> None:
    """Add ``consistency_solver`` to the stock sampler and scheduler lists, its problems worded for them, and the
    coefficient model folder (idempotent)."""
    from . import runtime
    from .messages import SAMPLER_BY_NAME, SCHEDULER_BY_NAME, worded

    runtime.register(
        worded(SAMPLER_BY_NAME, runtime.sample_consistency_solver),
        worded(SCHEDULER_BY_NAME, runtime.consistency_solver_scheduler),
    )


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register"]
