"""Forward-only calibration of ConsistencySolver coefficients to one model, with its guard (runtime: solver/ only).

``calibrate`` fits on part of the noises of a recorded refine (``record_run``) and keeps, per step count, the
candidate of least RMSE on the held-out rest; ``plan_noises`` says how many noises a budget of model calls buys.
"""

from .calibrator import (
    CALIBRATOR_REVISION,
    BudgetTooSmall,
    Calibration,
    NoisePlan,
    calibrate,
    plan_cost,
    plan_noises,
    source_candidate,
    stock_candidate,
)
from .guard import CALIBRATED, DEFAULT, STOCK, Candidate, Validation
from .target import CountedModel, MissedSigma, SamplerProbe, TargetRun, probe_sampler, record_run

__all__ = [
    "CALIBRATED",
    "CALIBRATOR_REVISION",
    "DEFAULT",
    "STOCK",
    "BudgetTooSmall",
    "Calibration",
    "Candidate",
    "CountedModel",
    "MissedSigma",
    "NoisePlan",
    "SamplerProbe",
    "TargetRun",
    "Validation",
    "calibrate",
    "plan_cost",
    "plan_noises",
    "probe_sampler",
    "record_run",
    "source_candidate",
    "stock_candidate",
]
