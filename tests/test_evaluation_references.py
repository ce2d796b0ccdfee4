"""The shared reference generator: ODE accuracy, agreement of the two methods, seeds, caching."""

import pytest
import torch

from consistency_solver.training.evaluation.references import (
    HELD_OUT_SEED_START,
    TRAINING_SEED_LIMIT,
    held_out_seeds,
    reference_finals,
    seeded_batch,
    training_seeds,
)
from consistency_solver.training.testbeds import get_testbed

pytest.importorskip("torchdiffeq", reason="reference ODE solves need torchdiffeq (the dev extra)")
torch.set_num_threads(1)  # the cores are shared; one thread is faster than two contended ones


def rms(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@pytest.mark.parametrize("name", ["gmm-vector-eps-cfg", "gmm-vector-flow-cfg"])
def test_ode_reference_error_is_below_1e_5(name):
    bed = get_testbed(name)
    noise, labels = seeded_batch(bed, held_out_seeds(8))
    reference = reference_finals(bed, noise.double(), labels, method="ode")
    tighter = reference_finals(bed, noise.double(), labels, method="ode", rtol=1e-10)
    assert rms(reference, tighter) < 1e-5


@pytest.mark.parametrize("name", ["gmm-vector-eps-cfg", "gmm-vector-flow"])
def test_multistep_reference_converges_to_the_ode_reference(name):
    bed = get_testbed(name)
    noise, labels = seeded_batch(bed, held_out_seeds(16))
    exact = reference_finals(bed, noise.double(), labels, method="ode", steps=40)
    multistep = reference_finals(bed, noise, labels, method="multistep", steps=40)
    coarse = reference_finals(bed, noise, labels, method="multistep", steps=10)
    assert multistep.dtype == torch.float32
    assert rms(multistep, exact) < 3e-3 < rms(coarse, exact)


def test_seeded_batches_are_reproducible_per_sample():
    bed = get_testbed("gmm-vector-eps-cfg")
    noise, labels = seeded_batch(bed, [10_005, 10_006, 10_007])
    single_noise, single_label = seeded_batch(bed, [10_006])
    assert torch.equal(noise[1:2], single_noise) and torch.equal(labels[1:2], single_label)
    assert held_out_seeds(2) == [HELD_OUT_SEED_START, HELD_OUT_SEED_START + 1]
    assert max(training_seeds(10)) < TRAINING_SEED_LIMIT <= HELD_OUT_SEED_START
    with pytest.raises(ValueError, match="below"):
        training_seeds(5, start=TRAINING_SEED_LIMIT - 2)
    with pytest.raises(ValueError, match="held-out"):
        held_out_seeds(5, start=0)


def test_cache_returns_the_stored_finals_and_keys_on_labels(tmp_path):
    bed = get_testbed("gmm-vector-eps-cfg")
    noise, labels = seeded_batch(bed, held_out_seeds(8))
    first = reference_finals(bed, noise, labels, method="multistep", cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    again = reference_finals(bed, noise, labels, method="multistep", cache_dir=tmp_path)
    assert torch.equal(first, again) and list(tmp_path.iterdir()) == files
    other_labels = (labels + 1) % bed.num_classes
    different = reference_finals(bed, noise, other_labels, method="multistep", cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2 and not torch.allclose(first, different)


def test_unknown_method_is_rejected():
    bed = get_testbed("gmm-vector-eps")
    with pytest.raises(ValueError, match="multistep"):
        reference_finals(bed, torch.zeros(1, 64), None, method="rk4")
