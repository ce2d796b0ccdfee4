"""ConsistencySolver / Diffusion Preview: a ComfyUI custom-node pack.

ComfyUI imports this folder by path; outside ComfyUI (tests, training, benchmarks) it is the plain
package ``consistency_solver`` and touches nothing of ComfyUI.
"""

import sys

__version__ = "0.1.0"

# ComfyUI has imported ``comfy`` before it loads custom nodes. Anywhere else the pack stays pure torch.
# No try/except: a broken import inside ComfyUI must show up as "IMPORT FAILED", not vanish.
# pytest, in a clone whose folder name is no Python name (consistency-solver), imports this file as a lone module,
# outside any package: there is nothing to register then.
if "comfy.samplers" in sys.modules and __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register

    register()
    WEB_DIRECTORY = "./web"  # frontend extensions: the seed shown stays; previews picked by click; calibration report
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
