"""Test beds: exact Gaussian mixtures and the learned Fashion-MNIST models, behind one interface (base.TestBed)."""

from __future__ import annotations

from pathlib import Path

from ...solver import UnknownChoice
from .base import TestBed, run_sigmas
from .gmm import GMM_BEDS, GMMTestBed, gmm_testbed

FASHION_BED = "fashion-eps-cfg"
# The same UNet architecture trained in ComfyUI's EPS (EDM-preconditioned), CONST (flow, shift 3) and V_PREDICTION
# parameterisations: learned beds that differ in parameterisation only; then two on a fixed 4-channel latent, as
# latent diffusion models work: the UNet as an EPS model on SD1.x's discrete schedule (as SD1.5) and a DiT as a
# rectified flow (as SD3 / Flux); then, so that no one architecture is a family's whole verdict on its default, a
# smaller DiT as EPS (as PixArt-alpha) and a two-level attention UNet as a flow, both on the latent.
FASHION_BEDS = (
    FASHION_BED,
    "fashion-flow-cfg",
    "fashion-v-cfg",
    "fashion-latent-eps-cfg",
    "fashion-dit-flow-cfg",
    "fashion-dit-eps-cfg",
    "fashion-latent-flow-cfg",
)
TESTBED_NAMES = (*GMM_BEDS, *FASHION_BEDS)
# The coefficient files trained on each bed: read by the benchmark and tests, kept out of solver/bundled/ so that
# ComfyUI's coefficient lists offer artists only the defaults.
COEFFICIENTS_DIR = Path(__file__).resolve().parent / "coefficients"


def get_testbed(name: str) -> TestBed:
    """The bed called ``name`` (one of ``TESTBED_NAMES``), built with its fixed default parameters."""
    if name in GMM_BEDS:
        return gmm_testbed(name)
    if name in FASHION_BEDS:
        # Imported here: the Fashion beds load shipped weights, which GMM-only users never need.
        from .fashion import FashionTestBed

        return FashionTestBed(name)
    raise UnknownChoice("test bed", name, TESTBED_NAMES)


__all__ = [
    "COEFFICIENTS_DIR",
    "FASHION_BED",
    "FASHION_BEDS",
    "TESTBED_NAMES",
    "GMMTestBed",
    "TestBed",
    "get_testbed",
    "gmm_testbed",
    "run_sigmas",
]
