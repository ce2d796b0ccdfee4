"""Test beds: exact Gaussian mixtures and the learned Fashion-MNIST model, behind one interface (base.TestBed)."""

from __future__ import annotations

from .base import TestBed, run_sigmas
from .gmm import GMM_BEDS, GMMTestBed, gmm_testbed

FASHION_BED = "fashion-eps-cfg"
TESTBED_NAMES = (*GMM_BEDS, FASHION_BED)


def get_testbed(name: str) -> TestBed:
    """The bed called ``name`` (one of ``TESTBED_NAMES``), built with its fixed default parameters."""
    if name in GMM_BEDS:
        return gmm_testbed(name)
    if name == FASHION_BED:
        # Imported here: the Fashion bed loads shipped weights, which GMM-only users never need.
        from .fashion import FashionTestBed

        return FashionTestBed()
    raise ValueError(f"unknown test bed {name!r}; known: {', '.join(TESTBED_NAMES)}")


__all__ = ["FASHION_BED", "TESTBED_NAMES", "GMMTestBed", "TestBed", "get_testbed", "gmm_testbed", "run_sigmas"]
