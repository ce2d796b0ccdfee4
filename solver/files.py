"""Coefficient files: one writer, one loader, strict validation.

A file is a ``.safetensors`` container (never a pickle) holding tensors plus string metadata:

==================  ==========================================================================
metadata key        meaning
==================  ==========================================================================
format              always ``consistency-solver-coefficients``
format_version      ``1``
kind                ``policy`` (the paper's MLP) or ``table`` (explicit weights per step count)
order               how many derivatives a step combines (history length)
model_family        what it was trained for: ``any``, or ``<name>-eps`` / ``<name>-flow`` (e.g.
                    ``sd15-eps``, ``flux-flow``); ``eps`` covers EPS and V-prediction models
trained_steps       comma-separated step counts it was trained on (a table: the counts it holds)
time_features       policy only: the feature kind (see ``solver.time_features``)
inference_mode      policy only: the deterministic read-out it was trained for, ``mode`` or ``expectation``
last_step           policy only, optional: the step to sigma = 0, ``learned`` (the policy's row, as every other
                    step; a file without the key) or ``denoised`` (the row [1, 0, ...], which returns the
                    model's denoised estimate as every stock sampler's last step does). A table stores its
                    last row as it is.
bins, hidden        policy only: grid size and MLP width
row_sums            table only: ``one`` (rows sum to 1) or ``free`` (rows sum to learned positive step
                    scales, see ``solver.coefficients``)
description         free text
training            JSON summary of how it was made (command, reward, model evaluations, ...)
==================  ==========================================================================

Policy tensors: ``mlp.0.weight/bias``, ``mlp.2.weight/bias``, ``mlp.4.weight/bias``,
``action_values``. Table tensors: ``weights.N<steps>`` of shape [steps, order].
Optional, for either kind, a learned schedule: ``schedule.N<steps>`` of shape [steps] for every
trained step count (``solver.schedules.StepSchedule``: increasing positions in log sigma, 0 at
sigma_max, 1 at sigma_min).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from .coefficients import ROW_SUMS, TableCoefficients, table_problem
from .errors import UnknownChoice, check_choice
from .policy import INFERENCE_MODES, LAST_STEPS, ConsistencyPolicy, PolicyCoefficients
from .schedules import StepSchedule, validate_positions
from .time_features import TIME_FEATURE_KINDS

FORMAT = "consistency-solver-coefficients"
FORMAT_VERSION = "1"
MODEL_KINDS = ("eps", "flow", "any")
_COMMON_KEYS = {
    "format",
    "format_version",
    "kind",
    "order",
    "model_family",
    "trained_steps",
    "description",
    "training",
}
_POLICY_KEYS = _COMMON_KEYS | {"time_features", "bins", "hidden", "inference_mode"}
_TABLE_KEYS = _COMMON_KEYS | {"row_sums"}
# Keys a file may leave out, with the value it then means: files written before ``last_step`` existed are learned.
_OPTIONAL_POLICY_KEYS = {"last_step": "learned"}
POLICY_TENSORS = (
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
    "mlp.4.weight",
    "mlp.4.bias",
    "action_values",
)

Coefficients = PolicyCoefficients | TableCoefficients


class CoefficientFileError(ValueError):
    """A coefficient file that cannot be used: the file, the problem and the fix (for a Python user)."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path, self.problem, self.fix = os.fspath(path), problem, fix
        super().__init__(f"coefficient file {self.path!r}: {problem}. Fix: {fix}")


_RETRAIN = "re-create it with `python -m consistency_solver.training` or the converter"


class _Invalid(Exception):
    """A problem found inside a readable file; load_coefficients adds the file's name."""

    def __init__(self, problem: str, fix: str = _RETRAIN):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@dataclass(frozen=True)
class _StoredCoefficients:
    """What a readable file holds once its common metadata is checked (schedule tensors already taken out)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    order: int
    trained_steps: tuple[int, ...]
    schedule: StepSchedule | None


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a ``.safetensors`` file whole or not at all, with the permissions the umask gives any new file.

    The bytes go to a file beside ``path`` that then replaces it, so an interrupted write never leaves a truncated
    file under the real name; Python's ``open`` is used because safetensors' own ``save_file`` creates mode 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def model_kind(model_family: str) -> str:
    """``sd15-eps`` -> ``eps``, ``flow`` -> ``flow``, ``any`` -> ``any``."""
    return model_family.rsplit("-", 1)[-1]


def save_coefficients(
    path: str | os.PathLike,
    coefficients: Coefficients,
    *,
    model_family: str,
    description: str = "",
    training: dict | None = None,
) -> None:
    """Write a policy or a table with full metadata (the file format above)."""
    if model_kind(model_family) not in MODEL_KINDS:
        raise ValueError(f"model_family {model_family!r} must be 'any' or end in -eps or -flow")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "order": str(coefficients.order),
        "model_family": model_family,
        "description": description,
        "training": json.dumps(training or {}, sort_keys=True),
    }
    if isinstance(coefficients, PolicyCoefficients):
        policy = coefficients.policy
        tensors = {
            name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in policy.state_dict().items()
        }
        metadata |= {
            "kind": "policy",
            "trained_steps": ",".join(str(n) for n in sorted(coefficients.trained_steps)),
            "time_features": coefficients.time_features,
            "inference_mode": coefficients.mode,
            "last_step": coefficients.last_step,
            "bins": str(policy.bins),
            "hidden": str(policy.hidden),
        }
    else:
        tensors = {
            f"weights.N{n}": table.detach().to("cpu", torch.float64).contiguous()
            for n, table in coefficients.tables.items()
        }
        metadata |= {
            "kind": "table",
            "trained_steps": ",".join(str(n) for n in sorted(coefficients.tables)),
            "row_sums": coefficients.row_sums,
        }
    if coefficients.schedule is not None:
        tensors |= {
            f"schedule.N{n}": positions.detach().to("cpu", torch.float64).contiguous()
            for n, positions in coefficients.schedule.positions.items()
        }
    write_safetensors(path, tensors, metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A coefficient file's metadata, without reading its tensors or validating it (empty when unreadable)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # any unreadable file has no metadata to offer; load_coefficients says why
        return {}


def load_coefficients(
    path: str | os.PathLike, *, mode: str | None = None, allow_untrained_steps: bool = False
) -> Coefficients:
    """Read and validate a coefficient file. Raises CoefficientFileError (a ValueError) on any problem.

    ``mode`` overrides a policy's stored inference mode (``mode`` = argmax, ``expectation`` = mean action).
    """
    if not os.path.isfile(path):
        raise CoefficientFileError(path, "no such file", "check the path or put the file in models/consistency_solver/")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors reports corrupt headers with several exception types
        raise CoefficientFileError(
            path,
            f"not a readable safetensors file ({error})",
            f"the file is damaged or of another format; {_RETRAIN}",
        ) from error
    try:
        stored = _stored_coefficients(tensors, metadata)
        if stored.metadata["kind"] == "table":
            return _table_from_file(stored)
        return _policy_from_file(stored, mode, allow_untrained_steps)
    except _Invalid as invalid:
        raise CoefficientFileError(path, invalid.problem, invalid.fix) from None


def _stored_coefficients(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> _StoredCoefficients:
    """Check what every file shares: format, version, kind, metadata keys, order, step counts, finite tensors."""
    if metadata.get("format") != FORMAT:
        raise _Invalid(
            f"metadata 'format' is {metadata.get('format')!r}, not {FORMAT!r}",
            "this is not a ConsistencySolver coefficient file",
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _Invalid(
            f"format version {metadata.get('format_version')!r} is not supported (this pack reads {FORMAT_VERSION!r})",
            "update the node pack, or re-export the file with this version",
        )
    kind = metadata.get("kind")
    _known("kind", kind, ("policy", "table"))
    required, optional = (_POLICY_KEYS, _OPTIONAL_POLICY_KEYS.keys()) if kind == "policy" else (_TABLE_KEYS, set())
    missing, unknown = sorted(required - metadata.keys()), sorted(metadata.keys() - required - optional)
    if missing or unknown:
        raise _Invalid(f"metadata keys missing {missing}, unknown {unknown}")
    if model_kind(metadata["model_family"]) not in MODEL_KINDS:
        raise _Invalid(f"model_family {metadata['model_family']!r} must be 'any' or end in -eps or -flow")
    try:
        order = int(metadata["order"])
        trained_steps = tuple(int(n) for n in metadata["trained_steps"].split(","))
        json.loads(metadata["training"])
    except ValueError as error:
        raise _Invalid(f"malformed metadata ({error})") from None
    except RecursionError:
        raise _Invalid("the 'training' metadata is JSON nested too deeply to read") from None
    if order < 1 or any(n < 1 for n in trained_steps):
        raise _Invalid(f"order {order} and trained_steps {trained_steps} must be positive")
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise _Invalid(f"tensor {name!r} contains NaN or infinite values")
    schedule = _schedule_from_file(tensors, trained_steps)
    return _StoredCoefficients(tensors, metadata, order, trained_steps, schedule)


def _schedule_from_file(tensors: dict[str, torch.Tensor], trained_steps: tuple[int, ...]) -> StepSchedule | None:
    """Pop the ``schedule.N*`` tensors (all trained step counts, or none) into a StepSchedule."""
    names = sorted(name for name in tensors if name.startswith("schedule."))
    if not names:
        return None
    expected = sorted(f"schedule.N{n}" for n in trained_steps)
    if names != expected:
        raise _Invalid(f"schedule tensors {names} do not match trained_steps {trained_steps} (expected {expected})")
    positions = {}
    for n in trained_steps:
        positions[n] = tensors.pop(f"schedule.N{n}").to(torch.float64)
        problem = validate_positions(positions[n], n)
        if problem:
            raise _Invalid(f"schedule.N{n}: {problem}")
    return StepSchedule(positions)


def _known(what: str, value: str, choices: tuple[str, ...]) -> None:
    try:
        check_choice(what, value, choices)
    except UnknownChoice as error:
        raise _Invalid(str(error)) from None


def _table_from_file(stored: _StoredCoefficients) -> TableCoefficients:
    row_sums, order, trained_steps = stored.metadata["row_sums"], stored.order, stored.trained_steps
    _known("row_sums", row_sums, ROW_SUMS)
    expected = {f"weights.N{n}" for n in trained_steps}
    if set(stored.tensors) != expected:
        raise _Invalid(
            f"tensors {sorted(stored.tensors)} do not match trained_steps {trained_steps} (expected {sorted(expected)})"
        )
    tables = {}
    for n in trained_steps:
        table = stored.tensors[f"weights.N{n}"].to(torch.float64)
        if table.shape != (n, order):
            raise _Invalid(f"weights.N{n} has shape {tuple(table.shape)}, expected {(n, order)}")
        problem = table_problem(table, row_sums)
        if problem:
            raise _Invalid(f"rows of weights.N{n} {problem}")
        tables[n] = table
    return TableCoefficients(
        tables=tables, order=order, metadata=stored.metadata, schedule=stored.schedule, row_sums=row_sums
    )


def _policy_from_file(stored: _StoredCoefficients, mode: str | None, allow_untrained_steps: bool) -> PolicyCoefficients:
    tensors, metadata, order = stored.tensors, stored.metadata, stored.order
    if set(tensors) != set(POLICY_TENSORS):
        raise _Invalid(f"policy tensors are {sorted(tensors)}, expected {sorted(POLICY_TENSORS)}")
    _known("inference_mode", metadata["inference_mode"], INFERENCE_MODES)
    last_step = metadata.get("last_step", _OPTIONAL_POLICY_KEYS["last_step"])
    _known("last_step", last_step, LAST_STEPS)
    _known("time_features", metadata["time_features"], TIME_FEATURE_KINDS)
    try:
        bins, hidden = int(metadata["bins"]), int(metadata["hidden"])
    except ValueError as error:
        raise _Invalid(f"malformed metadata ({error})") from None
    if order < 2 or bins < 2 or hidden < 1:
        raise _Invalid(
            f"a policy needs order >= 2 (one free weight per step), bins >= 2 and hidden >= 1; this one has "
            f"order {order}, bins {bins}, hidden {hidden}",
            f"{_RETRAIN}; for order 1 (plain Euler steps) use the 'euler' preset instead",
        )
    expected_shapes = {
        "mlp.0.weight": (hidden, 2),
        "mlp.0.bias": (hidden,),
        "mlp.2.weight": (hidden, hidden),
        "mlp.2.bias": (hidden,),
        "mlp.4.weight": ((order - 1) * bins, hidden),
        "mlp.4.bias": ((order - 1) * bins,),
        "action_values": (order - 1, bins),
    }
    for name, shape in expected_shapes.items():
        if tuple(tensors[name].shape) != shape:
            actual = tuple(tensors[name].shape)
            raise _Invalid(
                f"tensor {name!r} has shape {actual}, expected {shape} (order={order}, bins={bins}, hidden={hidden})"
            )
    policy = ConsistencyPolicy(order=order, bins=bins, hidden=hidden, action_values=tensors["action_values"])
    policy.load_state_dict({name: tensor.float() for name, tensor in tensors.items()})
    policy.eval()
    return PolicyCoefficients(
        policy=policy,
        time_features=metadata["time_features"],
        trained_steps=stored.trained_steps,
        mode=mode or metadata["inference_mode"],
        last_step=last_step,
        allow_untrained_steps=allow_untrained_steps,
        metadata=metadata,
        schedule=stored.schedule,
    )
