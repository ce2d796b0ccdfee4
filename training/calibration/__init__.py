"""Forward-only calibration of a coefficient table to one model (issue 10); depends only on solver/ and torch."""

from .calibrator import (
    CALIBRATOR_REVISION,
    BudgetTooSmall,
    Calibration,
    TargetRun,
    calibrate,
    calibrate_model,
    check_budget,
    jacobian_noise_count,
    minimum_budget,
    record_run,
)

__all__ = [
    "CALIBRATOR_REVISION",
    "BudgetTooSmall",
    "Calibration",
    "TargetRun",
    "calibrate",
    "calibrate_model",
    "check_budget",
    "jacobian_noise_count",
    "minimum_budget",
    "record_run",
]
