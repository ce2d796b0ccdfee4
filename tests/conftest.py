"""Fixtures shared by several test modules."""

import pytest
import torch
from fixtures.comfyui import missing_comfyui

from consistency_solver.training.evaluation.references import REFERENCE_CACHE_VARIABLE
from consistency_solver.training.evaluation.stock_samplers import comfy_unavailable_reason


@pytest.fixture(scope="session", autouse=True)
def reference_cache(tmp_path_factory):
    """References the tests build are cached for the session only, never in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(REFERENCE_CACHE_VARIABLE, str(tmp_path_factory.mktemp("references")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared 2-core machine run far faster on one thread than on contended two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def comfy_samplers() -> None:
    """ComfyUI's stock samplers are importable; else the test skips (fails in CI), saying how to get them."""
    reason = comfy_unavailable_reason()
    if reason is not None:
        missing_comfyui(reason)
