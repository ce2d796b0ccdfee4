"""The converter for the paper's released policy reproduces the released argmax rule for every (N, i)."""

import pytest
import torch

from consistency_solver.solver import load_coefficients
from consistency_solver.solver.convert import convert_released_policy, main
from consistency_solver.solver.schedules import DiscreteSchedule


def synthetic_release(path, bins: int = 11, hidden: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint with the released keys and shapes (paper-spec 1.3) and random, non-uniform weights."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        "mlp.0.weight": torch.randn(hidden, 2, generator=generator),
        "mlp.0.bias": torch.randn(hidden, generator=generator) * 0.1,
        "mlp.2.weight": torch.randn(hidden, hidden, generator=generator) / hidden**0.5,
        "mlp.2.bias": torch.randn(hidden, generator=generator) * 0.1,
        "mlp.4.weight": torch.randn(3 * bins, hidden, generator=generator),
        "mlp.4.bias": torch.randn(3 * bins, generator=generator),
        "action_values": torch.stack(
            [torch.linspace(0, 2, bins), torch.linspace(-2, 0, bins), torch.linspace(-1, 1, bins)]
        ),
    }
    torch.save(state, path)
    return state


def released_rule(state: dict[str, torch.Tensor], steps: int, i: int) -> list[float]:
    """The released scheduler_ppo.py step, written independently: trailing t_i, input [t_i, t_i - 1000//N]/999,
    argmax actions, w_1 = 1 + a_0, w_k = a_{k-1}, w_h = 1 - sum."""
    t = round(1000 - i * 1000 / steps) - 1
    features = torch.tensor([[t, t - 1000 // steps]], dtype=torch.float32) / 999
    hidden = torch.relu(features @ state["mlp.0.weight"].T + state["mlp.0.bias"])
    hidden = torch.relu(hidden @ state["mlp.2.weight"].T + state["mlp.2.bias"])
    logits = (hidden @ state["mlp.4.weight"].T + state["mlp.4.bias"]).reshape(3, -1)
    actions = [float(state["action_values"][d, logits[d].softmax(-1).argmax()]) for d in range(3)]
    history = min(i + 1, 4)
    weights = [1 + actions[0]] + actions[1 : history - 1]
    weights = weights[: history - 1] + [1 - sum(weights[: history - 1])]
    return weights + [0.0] * (4 - history)


def test_converted_file_gives_the_released_weights_for_every_step_of_every_step_count(tmp_path):
    state = synthetic_release(tmp_path / "model.ckpt")
    convert_released_policy(tmp_path / "model.ckpt", tmp_path / "sd15.safetensors")
    coefficients = load_coefficients(tmp_path / "sd15.safetensors")
    assert coefficients.metadata["model_family"] == "sd15-eps" and coefficients.mode == "mode"
    schedule = DiscreteSchedule()
    distinct = set()
    for steps in range(2, 16):
        table = coefficients.weights(schedule.trailing_sigmas(steps), schedule.timestep)
        for i in range(steps):
            expected = released_rule(state, steps, i)
            torch.testing.assert_close(table[i], torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
            distinct.add(tuple(round(w, 4) for w in expected))
    assert len(distinct) > 5, "the synthetic policy should pick many different coefficient sets"


def test_converter_accepts_wrapped_state_dicts_and_the_cli(tmp_path, capsys):
    state = synthetic_release(tmp_path / "plain.ckpt", bins=21, hidden=64)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.ckpt")
    main([str(tmp_path / "wrapped.ckpt"), str(tmp_path / "out.safetensors")])
    assert "wrote" in capsys.readouterr().out
    assert load_coefficients(tmp_path / "out.safetensors").policy.bins == 21


def test_converter_refuses_scaler_actions_and_foreign_checkpoints(tmp_path):
    state = synthetic_release(tmp_path / "model.ckpt")
    state["mlp.4.weight"] = torch.zeros(35, 256)
    state["mlp.4.bias"] = torch.zeros(35)
    torch.save(state, tmp_path / "scalers.ckpt")
    with pytest.raises(ValueError, match="scaler actions"):
        convert_released_policy(tmp_path / "scalers.ckpt", tmp_path / "out.safetensors")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="lacks the policy tensors"):
        convert_released_policy(tmp_path / "other.ckpt", tmp_path / "out.safetensors")


def test_converter_never_unpickles_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="(?i)weights only|unsupported|global"):
        convert_released_policy(tmp_path / "evil.ckpt", tmp_path / "out.safetensors")
