"""How long the model fingerprint takes on a model of SDXL's size: what every ``auto`` and every Calibrate run pays.

    python -m consistency_solver.training.evaluation.fingerprint_benchmark [--repeats 5]

Builds SDXL's UNet (ComfyUI's own classes and SDXL's detected configuration: 2.57 G parameters, 1,680 tensors) in
fp16 with random weights, wraps it in a ModelPatcher, and times ``nodes.fingerprint.model_fingerprint`` on it: the
first call (it reads 32 values of every tensor), a call on the same ModelPatcher (cached), and a call after a patch
(a LoRA: the weights part stays cached per model, the patches are read again). Needs ComfyUI (``COMFYUI_PATH``) and
about 6 GB of memory.
"""

from __future__ import annotations

import argparse
import time

import torch

from ...nodes import fingerprint
from ...nodes.fingerprint import model_fingerprint
from .stock_samplers import import_comfy

SDXL_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def sdxl_patcher():
    """SDXL's UNet in fp16 with random weights, in a ComfyUI ModelPatcher (on the CPU)."""
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, device=torch.device("meta"))
    model.diffusion_model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.diffusion_model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype))
    return comfy.model_patcher.ModelPatcher(model, load_device="cpu", offload_device="cpu")


def timed(function) -> tuple[float, str]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh ModelPatchers timed (the first call each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    patcher = sdxl_patcher()
    state = patcher.model.diffusion_model.state_dict()
    parameters = sum(tensor.numel() for tensor in state.values())
    first, cached, patched = [], [], []
    for _ in range(args.repeats):
        model = patcher.clone()
        fingerprint._weights.pop(model.model, None)  # every repeat reads the weights again
        seconds, value = timed(lambda model=model: model_fingerprint(model, "eps"))
        first.append(seconds)
        cached.append(timed(lambda model=model: model_fingerprint(model, "eps"))[0])
        key = next(name for name in state if name.endswith("proj_in.weight"))
        model.add_patches({f"diffusion_model.{key}": (torch.ones_like(state[key]),)}, 0.5)
        seconds, changed = timed(lambda model=model: model_fingerprint(model, "eps"))
        patched.append(seconds)
        assert changed != value, "a LoRA must change the fingerprint"
    print(f"SDXL UNet: {len(state)} tensors, {parameters / 1e9:.2f} G parameters, fp16, one CPU thread")
    print("| call | median seconds | max seconds |")
    print("|---|---|---|")
    for name, values in (("first (reads every tensor)", first), ("again (cached)", cached), ("after a LoRA", patched)):
        print(f"| {name} | {sorted(values)[len(values) // 2]:.4f} | {max(values):.4f} |")


if __name__ == "__main__":
    main()
