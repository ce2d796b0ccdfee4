"""ComfyUI glue. Importable without ComfyUI: only ``register()`` and running a node touch ``comfy``."""

from .definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def register() -> None:
    """Add ``consistency_solver`` to the stock sampler lists and the coefficient model folder (idempotent)."""
    from . import runtime

    runtime.register()


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register"]
