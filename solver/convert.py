"""Convert the paper's released policy checkpoint (``model.ckpt`` of G-U-N/consolver) into a coefficient file.

The checkpoint is a state dict with ``mlp.0/2/4`` weights and ``action_values`` (paper-spec 1.3). It is
read with ``torch.load(weights_only=True)``, so no code in it can run. The released SD1.5 policy is
conditioned on ``(t_i/999, (t_i - 1000//N)/999)``, which is the ``sd15_timestep`` time-feature kind; the
paper's FLUX-Kontext policy is conditioned on ``(sigma_i, sigma_{i+1})`` (kind ``sigma``).

Usage: ``python -m consistency_solver.solver.convert model.ckpt sd15-consolver.safetensors [--preset sd15]``
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import torch

from .errors import check_choice
from .files import POLICY_TENSORS, save_coefficients
from .policy import ConsistencyPolicy, PolicyCoefficients

# What each released policy was trained on (paper-spec 1.2-1.5): features, family, step counts.
RELEASED_POLICIES = {
    "sd15": {"time_features": "sd15_timestep", "model_family": "sd15-eps", "trained_steps": tuple(range(2, 16))},
    "flux-kontext": {"time_features": "sigma", "model_family": "flux-flow", "trained_steps": (2, 3, 4, 5)},
}


def _state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Unwrap the containers training scripts commonly add ({"state_dict": ...}, "module." prefixes)."""
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
    return {name.removeprefix("module."): tensor for name, tensor in checkpoint.items() if torch.is_tensor(tensor)}


def policy_from_checkpoint(path: str | os.PathLike) -> ConsistencyPolicy:
    """Rebuild the released policy network, taking order, bins and grids from its own tensors."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{os.fspath(path)!r} is not a state-dict checkpoint (got {type(checkpoint).__name__})")
    state = _state_dict(checkpoint)
    expected = set(POLICY_TENSORS)
    if missing := expected - state.keys():
        raise ValueError(
            f"{os.fspath(path)!r} lacks the policy tensors {sorted(missing)}; is it a ConsistencySolver policy?"
        )
    free, bins = state["action_values"].shape
    hidden = state["mlp.0.weight"].shape[0]
    if state["mlp.4.weight"].shape[0] != free * bins:
        raise ValueError(
            f"{os.fspath(path)!r} has {state['mlp.4.weight'].shape[0]} outputs for {free} coefficients x {bins} bins: "
            "a policy with scaler actions (scaler_dim > 0) breaks the sum-to-1 rule and is not supported"
        )
    policy = ConsistencyPolicy(order=free + 1, bins=bins, hidden=hidden, action_values=state["action_values"])
    policy.load_state_dict({name: state[name].float() for name in expected})
    return policy.eval()


def convert_released_policy(source: str | os.PathLike, destination: str | os.PathLike, preset: str = "sd15") -> None:
    """Write the released checkpoint as a coefficient file with the conditioning it was trained on."""
    check_choice("preset", preset, tuple(RELEASED_POLICIES))
    released = RELEASED_POLICIES[preset]
    coefficients = PolicyCoefficients(
        policy=policy_from_checkpoint(source),
        time_features=released["time_features"],
        trained_steps=released["trained_steps"],
        mode="mode",
    )
    save_coefficients(
        destination,
        coefficients,
        model_family=released["model_family"],
        description=f"Converted from the paper's released {preset} policy ({os.path.basename(source)}); "
        "inference by argmax, the deterministic reading of the released stochastic policy.",
        training={"source": os.path.basename(os.fspath(source)), "converter": "consistency_solver.solver.convert"},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the released model.ckpt")
    parser.add_argument("output", help="where to write the .safetensors coefficient file")
    parser.add_argument("--preset", choices=sorted(RELEASED_POLICIES), default="sd15", help="which released policy")
    args = parser.parse_args(argv)
    convert_released_policy(args.checkpoint, args.output, args.preset)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
