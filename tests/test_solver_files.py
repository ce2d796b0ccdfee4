"""Coefficient files: round trips, and a clear CoefficientFileError for every kind of broken file."""

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from consistency_solver.solver import (
    CoefficientFileError,
    ConsistencyPolicy,
    PolicyCoefficients,
    StepSchedule,
    TableCoefficients,
    load_coefficients,
    save_coefficients,
)
from consistency_solver.solver.errors import UntrainedStepCount
from consistency_solver.solver.files import FORMAT
from consistency_solver.solver.schedules import karras_sigmas, schedule_positions, sigmas_from_positions


def trained_policy(order: int = 4, bins: int = 11) -> PolicyCoefficients:
    policy = ConsistencyPolicy(order=order, bins=bins, hidden=32)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.normal_(0, 0.5)
    return PolicyCoefficients(policy, time_features="log_sigma", trained_steps=tuple(range(3, 13)))


def two_step_table() -> TableCoefficients:
    return TableCoefficients({2: torch.tensor([[1.0, 0.0], [1.5, -0.5]], dtype=torch.float64)}, order=2)


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.safetensors"
    save_coefficients(path, trained_policy(), model_family="gmm-eps", description="test", training={"steps": 3})
    return path


def rewrite(path, tensors=None, **metadata_changes):
    """Write a copy of a valid file with some tensors or metadata replaced (None deletes a key)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    stored.update(tensors or {})
    for key, value in metadata_changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    broken = path.with_name("broken.safetensors")
    save_file(stored, str(broken), metadata=metadata)
    return broken


@pytest.mark.parametrize("mode", ["mode", "expectation"])
def test_policy_round_trip_gives_the_same_weights(policy_file, mode):
    original = trained_policy()
    loaded = load_coefficients(policy_file, mode=mode)
    sigmas = karras_sigmas(8, 0.0292, 14.6146)
    expected = PolicyCoefficients(original.policy, "log_sigma", original.trained_steps, mode=mode).weights(sigmas)
    torch.testing.assert_close(loaded.weights(sigmas), expected)
    assert loaded.metadata["model_family"] == "gmm-eps"
    assert json.loads(loaded.metadata["training"]) == {"steps": 3}


def test_policy_file_remembers_its_inference_mode(tmp_path):
    coefficients = trained_policy()
    path = tmp_path / "expectation.safetensors"
    save_coefficients(
        path, PolicyCoefficients(coefficients.policy, "log_sigma", (4,), mode="expectation"), model_family="any"
    )
    assert load_coefficients(path).mode == "expectation"
    assert load_coefficients(path, mode="mode").mode == "mode"


def test_a_policy_file_remembers_a_denoised_last_step(tmp_path):
    path = tmp_path / "denoised.safetensors"
    save_coefficients(path, dataclasses.replace(trained_policy(), last_step="denoised"), model_family="gmm-flow")
    loaded = load_coefficients(path)
    assert loaded.last_step == "denoised" and loaded.metadata["last_step"] == "denoised"
    sigmas = karras_sigmas(8, 0.0292, 14.6146)
    assert loaded.weights(sigmas)[-1].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(loaded.weights(sigmas)[:-1], trained_policy().weights(sigmas)[:-1])


def test_a_policy_file_from_before_last_step_loads_as_learned_with_the_same_weights(policy_file):
    assert load_coefficients(policy_file).metadata["last_step"] == "learned"
    old = load_coefficients(rewrite(policy_file, last_step=None))
    assert old.last_step == "learned" and "last_step" not in old.metadata
    sigmas = karras_sigmas(8, 0.0292, 14.6146)
    torch.testing.assert_close(old.weights(sigmas), trained_policy().weights(sigmas))


def test_an_unknown_last_step_is_refused_naming_the_choices_and_a_table_has_none(policy_file, tmp_path):
    with pytest.raises(CoefficientFileError, match="unknown last_step 'euler'; choose one of learned, denoised.*Fix"):
        load_coefficients(rewrite(policy_file, last_step="euler"))
    table = tmp_path / "table.safetensors"
    save_coefficients(table, two_step_table(), model_family="flow")
    # A table stores its last row as it is: the key is not one of a table's.
    with pytest.raises(CoefficientFileError, match=r"unknown \['last_step'\]"):
        load_coefficients(rewrite(table, last_step="denoised"))


def test_table_round_trip(tmp_path):
    path = tmp_path / "table.safetensors"
    save_coefficients(path, two_step_table(), model_family="flow")
    loaded = load_coefficients(path)
    torch.testing.assert_close(loaded.weights(torch.tensor([1.0, 0.5, 0.0])), two_step_table().tables[2])


def test_missing_file(tmp_path):
    with pytest.raises(CoefficientFileError, match="no such file.*models/consistency_solver"):
        load_coefficients(tmp_path / "absent.safetensors")


def test_truncated_file(policy_file):
    data = policy_file.read_bytes()
    policy_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CoefficientFileError, match="policy.safetensors.*not a readable safetensors file.*Fix"):
        load_coefficients(policy_file)


def test_pickle_disguised_as_safetensors_is_never_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle was executed')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CoefficientFileError, match="evil.safetensors.*not a readable safetensors file"):
        load_coefficients(path)


def test_wrong_format_version(policy_file):
    with pytest.raises(CoefficientFileError, match="format version '99' is not supported.*update the node pack"):
        load_coefficients(rewrite(policy_file, format_version="99"))


def test_not_a_coefficient_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CoefficientFileError, match="lora.safetensors.*not a ConsistencySolver coefficient file"):
        load_coefficients(path)


def test_wrong_tensor_shape(policy_file):
    with pytest.raises(CoefficientFileError, match="'mlp.4.weight' has shape \\(3, 32\\), expected \\(33, 32\\)"):
        load_coefficients(rewrite(policy_file, {"mlp.4.weight": torch.zeros(3, 32)}))


def test_nan_weights(policy_file):
    bad = torch.zeros(32, 32)
    bad[0, 0] = float("nan")
    with pytest.raises(CoefficientFileError, match="'mlp.2.weight' contains NaN"):
        load_coefficients(rewrite(policy_file, {"mlp.2.weight": bad}))


def test_missing_and_unknown_metadata_keys(policy_file):
    with pytest.raises(CoefficientFileError, match="missing \\['time_features'\\], unknown \\['color'\\]"):
        load_coefficients(rewrite(policy_file, time_features=None, color="red"))


def test_unknown_time_features(policy_file):
    with pytest.raises(CoefficientFileError, match="unknown time_features 'karras_index'"):
        load_coefficients(rewrite(policy_file, time_features="karras_index"))


def test_unknown_tensor(policy_file):
    with pytest.raises(CoefficientFileError, match="policy tensors are"):
        load_coefficients(rewrite(policy_file, {"extra": torch.zeros(1)}))


def test_bad_model_family(policy_file):
    with pytest.raises(CoefficientFileError, match="model_family 'sd15' must be 'any' or end in -eps or -flow"):
        load_coefficients(rewrite(policy_file, model_family="sd15"))


def test_table_rows_must_sum_to_one(tmp_path):
    path = tmp_path / "table.safetensors"
    save_coefficients(path, two_step_table(), model_family="flow")
    bad = torch.tensor([[1.0, 0.0], [1.5, -0.4]], dtype=torch.float64)
    with pytest.raises(CoefficientFileError, match="rows of weights.N2 do not sum to 1"):
        load_coefficients(rewrite(path, {"weights.N2": bad}))


def test_free_row_sums_table_round_trip_and_validation(tmp_path):
    path = tmp_path / "free.safetensors"
    table = torch.tensor([[0.9, 0.0], [1.8, -0.6]], dtype=torch.float64)
    save_coefficients(path, TableCoefficients({2: table}, order=2, row_sums="free"), model_family="flow")
    loaded = load_coefficients(path)
    assert loaded.row_sums == "free" and loaded.metadata["row_sums"] == "free"
    assert torch.equal(loaded.tables[2], table)
    with pytest.raises(CoefficientFileError, match="must sum to positive step scales"):
        load_coefficients(rewrite(path, {"weights.N2": torch.tensor([[0.9, 0.0], [0.2, -0.6]], dtype=torch.float64)}))
    with pytest.raises(CoefficientFileError, match="unknown row_sums 'loose'"):
        load_coefficients(rewrite(path, row_sums="loose"))
    with pytest.raises(CoefficientFileError, match="rows of weights.N2 do not sum to 1"):
        load_coefficients(rewrite(path, row_sums="one"))


def test_deeply_nested_training_metadata_is_a_file_error(policy_file):
    nested = "[" * 100_000 + "]" * 100_000
    with pytest.raises(
        CoefficientFileError, match=r"broken.safetensors.*'training' metadata is JSON nested too deeply"
    ):
        load_coefficients(rewrite(policy_file, training=nested))


def test_a_table_row_weighing_a_derivative_that_does_not_exist_yet_is_refused(tmp_path):
    path = tmp_path / "table.safetensors"
    save_coefficients(path, two_step_table(), model_family="flow")
    early = torch.tensor([[0.5, 0.5], [1.5, -0.5]], dtype=torch.float64)
    with pytest.raises(
        CoefficientFileError,
        match=r"broken.safetensors.*rows of weights.N2 put weight on derivatives that do not exist yet \(row 0",
    ):
        load_coefficients(rewrite(path, {"weights.N2": early}))


@pytest.mark.parametrize("order, bins", [(1, 11), (4, 1)])
def test_a_policy_with_order_or_bins_below_two_names_the_file_and_the_fix(tmp_path, order, bins):
    path = tmp_path / "policy.safetensors"
    save_coefficients(path, trained_policy(order=2, bins=2), model_family="any")
    free, grid = order - 1, bins
    tensors = {
        "mlp.4.weight": torch.zeros(free * grid, 32),
        "mlp.4.bias": torch.zeros(free * grid),
        "action_values": torch.zeros(free, grid),
    }
    broken = rewrite(path, tensors, order=str(order), bins=str(bins))
    with pytest.raises(
        CoefficientFileError, match=rf"broken.safetensors.*order {order}, bins {bins}, hidden 32.*Fix: .*'euler' preset"
    ):
        load_coefficients(broken)


def test_table_shape_must_match_its_step_count(tmp_path):
    path = tmp_path / "table.safetensors"
    save_coefficients(path, two_step_table(), model_family="flow")
    with pytest.raises(CoefficientFileError, match="weights.N2 has shape \\(3, 2\\), expected \\(2, 2\\)"):
        load_coefficients(rewrite(path, {"weights.N2": torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)}))


def test_every_error_is_a_value_error_naming_the_fix(policy_file):
    with pytest.raises(ValueError) as error:
        load_coefficients(rewrite(policy_file, format=FORMAT + "-v2"))
    assert "broken.safetensors" in str(error.value) and "Fix:" in str(error.value)


def learned_schedule(steps=(3, 4)) -> StepSchedule:
    return StepSchedule({n: torch.linspace(0, 0.9, n, dtype=torch.float64) ** 1.5 for n in steps})


@pytest.mark.parametrize("kind", ["policy", "table"])
def test_learned_schedule_round_trip(tmp_path, kind):
    if kind == "policy":
        source = dataclasses.replace(trained_policy(), trained_steps=(3, 4), schedule=learned_schedule())
    else:
        tables = {n: torch.tensor([[1.0, 0.0]] * n, dtype=torch.float64) for n in (3, 4)}
        source = TableCoefficients(tables, order=2, schedule=learned_schedule())
    path = tmp_path / "scheduled.safetensors"
    save_coefficients(path, source, model_family="gmm-eps")
    loaded = load_coefficients(path)
    for n in (3, 4):
        expected = learned_schedule().sigmas(n, 0.03, 14.6)
        assert torch.equal(loaded.schedule.sigmas(n, 0.03, 14.6), expected)
        assert expected[0] == pytest.approx(14.6) and expected[-1] == 0


def test_files_without_a_schedule_load_with_none(policy_file):
    assert load_coefficients(policy_file).schedule is None


@pytest.fixture
def scheduled_file(tmp_path):
    path = tmp_path / "scheduled.safetensors"
    source = dataclasses.replace(trained_policy(), trained_steps=(3, 4), schedule=learned_schedule())
    save_coefficients(path, source, model_family="gmm-eps")
    return path


@pytest.mark.parametrize(
    "positions, message",
    [
        (torch.tensor([0.0, 0.5, 0.4], dtype=torch.float64), "increase strictly"),
        (torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), "must be 0"),
        (torch.tensor([0.0, 0.5, 1.5], dtype=torch.float64), "beyond sigma_min"),
        (torch.tensor([0.0, 0.5], dtype=torch.float64), "shape"),
    ],
)
def test_broken_schedule_is_refused(scheduled_file, positions, message):
    with pytest.raises(CoefficientFileError, match=message):
        load_coefficients(rewrite(scheduled_file, {"schedule.N3": positions}))


def test_schedule_must_cover_every_trained_step_count(scheduled_file):
    from safetensors import safe_open

    with safe_open(str(scheduled_file), framework="pt") as handle:
        metadata = dict(handle.metadata())
        stored = {name: handle.get_tensor(name) for name in handle.keys() if name != "schedule.N4"}
    partial = scheduled_file.with_name("partial.safetensors")
    save_file(stored, str(partial), metadata=metadata)
    with pytest.raises(CoefficientFileError, match="do not match trained_steps"):
        load_coefficients(partial)


def test_schedule_refuses_untrained_step_counts():
    with pytest.raises(UntrainedStepCount, match="schedule was trained for 3-4 steps, not 6") as error:
        learned_schedule().sigmas(6, 0.03, 14.6)
    assert (error.value.what, error.value.asked, error.value.trained) == ("schedule", 6, (3, 4))


def test_positions_invert_sigmas():
    sigmas = karras_sigmas(7, 0.03, 14.6)
    positions = schedule_positions(sigmas, 0.03, 14.6)
    assert float(positions[0]) == pytest.approx(0, abs=1e-12) and float(positions[-1]) == pytest.approx(1)
    assert torch.allclose(sigmas_from_positions(positions, 0.03, 14.6), sigmas, rtol=1e-12, atol=0)
