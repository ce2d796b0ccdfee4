"""ConsistencySolver in pure torch: the sampler, coefficient sources and the coefficient file format."""

from .coefficients import PRESET_NAMES, CoefficientSource, Preset, TableCoefficients, adams_bashforth_weights
from .equivalent import equivalent_table
from .errors import (
    InvalidWeights,
    NotLinearMultistep,
    UnknownChoice,
    UntrainedStepCount,
    check_choice,
    format_steps,
    parse_step_counts,
)
from .files import CoefficientFileError, load_coefficients, model_kind, read_metadata, save_coefficients
from .policy import ConsistencyPolicy, PolicyCoefficients, actions_to_weights, active_action_mask
from .sampling import coefficient_table, sample_consistency_solver, to_d
from .schedules import StepSchedule
from .time_features import TIME_FEATURE_KINDS, time_features

__all__ = [
    "PRESET_NAMES",
    "TIME_FEATURE_KINDS",
    "CoefficientFileError",
    "CoefficientSource",
    "InvalidWeights",
    "NotLinearMultistep",
    "UnknownChoice",
    "UntrainedStepCount",
    "ConsistencyPolicy",
    "PolicyCoefficients",
    "Preset",
    "StepSchedule",
    "TableCoefficients",
    "actions_to_weights",
    "active_action_mask",
    "adams_bashforth_weights",
    "check_choice",
    "coefficient_table",
    "equivalent_table",
    "format_steps",
    "load_coefficients",
    "model_kind",
    "parse_step_counts",
    "read_metadata",
    "sample_consistency_solver",
    "save_coefficients",
    "time_features",
    "to_d",
]
