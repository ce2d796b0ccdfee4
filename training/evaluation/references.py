"""THE reference-trajectory generator: the "full-step final" a preview is compared with.

Shared by tests, training and benchmarks so that all of them mean the same thing by "reference":

- ``method="ode"``: the probability-flow ODE solved with torchdiffeq's dopri5 (float64, rtol = atol = 1e-8 by
  default) from the bed's first sigma to its last nonzero sigma of a ``steps``-step schedule, then the final jump
  x -> D(x, sigma_last) that every sampler ends with. Eps beds integrate in u = log sigma (dx/du = x - D), flow
  beds in s itself (dx/ds = (x - D) / s); both are the same ODE dx/dsigma = (x - D) / sigma.
- ``method="multistep"``: a ``steps``-step run on the bed's schedule, as a user's many-step refine run: the
  variable-step Adams-Bashforth-4 preset of the solver down to the last nonzero sigma, then the same final jump
  (``steps`` model calls in all). Ending like the ODE reference and like ComfyUI's stock samplers keeps both
  methods converging to the same final. The benchmark uses this at 40 steps.

Noises come from seeds, one generator per sample, so sample j of any batch is reproducible from its seed alone.
Training draws seeds below ``TRAINING_SEED_LIMIT``; benchmarks and the demo use ``HELD_OUT_SEED_START`` and up.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ...solver import Preset, check_choice, sample_consistency_solver
from ...solver.files import write_safetensors
from ..testbeds.base import TestBed

TRAINING_SEED_LIMIT = 10_000  # training noises use seeds 0 .. 9_999
HELD_OUT_SEED_START = 10_000  # evaluation noises use seeds 10_000 and up, never seen in training
REFERENCE_METHODS = ("ode", "multistep")
MULTISTEP_PRESET = "ab4"
# Bump when the computation below changes, so stale cache files are not reused.
REFERENCE_VERSION = "1"
REFERENCE_CACHE_VARIABLE = "CONSISTENCY_SOLVER_REFERENCE_CACHE"


def reference_cache_dir() -> Path:
    """Where the trainer and the benchmark cache reference finals: ``$CONSISTENCY_SOLVER_REFERENCE_CACHE`` when set,
    else ``consistency-solver/references`` under ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    override = os.environ.get(REFERENCE_CACHE_VARIABLE)
    if override:
        return Path(override)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "consistency-solver" / "references"


def seeded_batch(bed: TestBed, seeds: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Noise [n, *shape] and labels [n] (or None) with sample j drawn from its own generator seeded ``seeds[j]``."""
    noises, labels = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        noises.append(bed.noise(1, generator))
        labels.append(bed.sample_labels(1, generator))
    return torch.cat(noises), None if labels[0] is None else torch.cat(labels)


def held_out_seeds(count: int, start: int = HELD_OUT_SEED_START) -> list[int]:
    if start < HELD_OUT_SEED_START:
        raise ValueError(f"held-out seeds start at {HELD_OUT_SEED_START} (training uses the seeds below), got {start}")
    return list(range(start, start + count))


def training_seeds(count: int, start: int = 0) -> list[int]:
    if start + count > TRAINING_SEED_LIMIT:
        raise ValueError(f"training seeds must stay below {TRAINING_SEED_LIMIT}; got {start} .. {start + count - 1}")
    return list(range(start, start + count))


def reference_finals(
    bed: TestBed,
    noise: Tensor,
    labels: Tensor | None,
    *,
    method: str = "multistep",
    steps: int = 40,
    cache_dir: str | os.PathLike | None = None,
    rtol: float = 1e-8,
) -> Tensor:
    """The reference final sample for each noise (and label) of the batch, in ``noise``'s dtype.

    ``steps`` fixes the schedule: the ODE runs to its last nonzero sigma (for flow beds that depends on
    ``steps``), the multistep method takes that many steps. ``rtol`` (= atol) applies to ``method="ode"``.
    With ``cache_dir`` the result is stored under a hash of everything that determines it; a cache file that
    cannot be read (say, cut short by a full disk) is named in a warning and rebuilt.
    """
    check_choice("reference method", method, REFERENCE_METHODS)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{_cache_key(bed, noise, labels, method, steps, rtol)}.safetensors"
        cached = _cached_finals(cache_path, noise) if cache_path.is_file() else None
        if cached is not None:
            return cached
    if method == "ode":
        finals = _ode_finals(bed, noise, labels, steps, rtol)
    else:
        finals = multistep_run(bed, noise, labels, steps)
    finals = finals.to(noise.dtype)
    if cache_path is not None:
        write_safetensors(cache_path, {"finals": finals.contiguous()})
    return finals


def _cached_finals(path: Path, noise: Tensor) -> Tensor | None:
    """The finals stored at ``path``, or None (after a warning naming the file) when they cannot be used."""
    try:
        finals = load_file(os.fspath(path)).get("finals")
    except (OSError, SafetensorError) as error:
        problem = f"it cannot be read ({error})"
    else:
        if finals is None:
            problem = "it holds no 'finals' tensor"
        elif finals.shape != noise.shape:
            problem = f"it holds finals of shape {tuple(finals.shape)}, not {tuple(noise.shape)}"
        elif not finals.isfinite().all():
            problem = "it holds NaN or infinite values"
        else:
            return finals.to(noise.dtype)
    warnings.warn(f"reference cache file {os.fspath(path)!r} is damaged: {problem}; computing it again", stacklevel=3)
    return None


def _cache_key(bed: TestBed, noise: Tensor, labels: Tensor | None, method: str, steps: int, rtol: float) -> str:
    digest = hashlib.sha256()
    settings = f"v{REFERENCE_VERSION}|{bed.identity()}|{method}|{steps}|{noise.dtype}|{tuple(noise.shape)}"
    if method == "ode":
        settings += f"|rtol={rtol!r}"
    else:
        settings += f"|{MULTISTEP_PRESET}"
    digest.update(settings.encode())
    digest.update(noise.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return f"{bed.name}-{method}{steps}-{digest.hexdigest()[:24]}"


def multistep_run(
    bed: TestBed, noise: Tensor, labels: Tensor | None, steps: int, callback: Callable[[dict], None] | None = None
) -> Tensor:
    """The uncached ``method="multistep"`` run; ``callback`` sees every step's ``i`` and ``denoised``, as a
    ComfyUI sampler callback does (what the live preview of a refine run shows)."""
    sigmas = bed.sigmas(steps).to(noise.dtype)
    return reference_sampler(bed.model(labels), bed.initial_state(noise, sigmas), sigmas, callback=callback)


def reference_sampler(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
) -> Tensor:
    """The multistep reference as a sampler (k-diffusion contract): MULTISTEP_PRESET to the last nonzero sigma,
    then the model's denoised estimate there, as the stock samplers end."""
    extra_args = extra_args or {}
    preset = Preset(MULTISTEP_PRESET)
    x_last = sample_consistency_solver(
        model, x, sigmas[:-1], extra_args, callback=callback, disable=True, coefficients=preset
    )
    finals = model(x_last, sigmas[-2] * x.new_ones(x.shape[0]), **extra_args)
    if callback is not None:
        callback({"x": x_last, "i": len(sigmas) - 2, "sigma": sigmas[-2], "sigma_hat": sigmas[-2], "denoised": finals})
    return finals


@torch.no_grad()
def _ode_finals(bed: TestBed, noise: Tensor, labels: Tensor | None, steps: int, rtol: float) -> Tensor:
    from torchdiffeq import odeint  # a dev dependency: only reference solves need it

    sigmas = bed.sigmas(steps)
    sigma_start, sigma_last = sigmas[0], sigmas[-2]
    x = bed.initial_state(noise.to(torch.float64), sigmas)
    ones = torch.ones(x.shape[0], dtype=torch.float64)

    if bed.kind == "eps":

        def velocity(u: Tensor, state: Tensor) -> Tensor:  # dx/du with u = log sigma
            return state - bed.denoise(state, u.exp() * ones, labels)

        times = torch.stack([sigma_start.log(), sigma_last.log()])
    else:

        def velocity(s: Tensor, state: Tensor) -> Tensor:  # dx/ds
            return (state - bed.denoise(state, s * ones, labels)) / s

        times = torch.stack([sigma_start, sigma_last])
    x_last = odeint(velocity, x, times, method="dopri5", rtol=rtol, atol=rtol)[-1]
    return bed.denoise(x_last, sigma_last * ones, labels)
