"""The paper's user study, simulated: how many model calls does an artist spend per accepted image?

    python -m consistency_solver.training.evaluation.preview_loop [--coefficients PATH] [--calibrate-budget 3000]
        [--thresholds 0.99] [--ink-band 0.35 0.65] [--seeds 16]

The artist is selective: an image of class c is accepted when the shipped Fashion-MNIST classifier (standing in
for the artist's judgement) gives c a probability of at least ``threshold`` *and* its ink mass (the share of the
image that is ink) lies in a band: between the ``--ink-band`` quantiles of that class's finals (a garment of
medium weight). With the defaults 10-30 % of seeds pass. Going through seeds in order, with each method the
artist:

- a preview (ConsistencySolver with the default file, with a file calibrated to this model, or dpmpp_2m):
  samples an N-step preview (N calls); if it passes, refines it with the 40-step run from the same noise
  (40 more calls) and checks the final;
- live preview: starts the 40-step refine run and looks at its denoised estimate after N steps; a
  failing preview aborts the run (N calls), a passing one lets it finish (40 calls in all);
- no preview: runs the full 40 steps for every seed.

A request ends at the first final that passes; then the next request starts at the next seed. Reported per
method: mean model calls per accepted final, accepted finals, false accepts (the preview passed, its final
failed) and false rejects (the preview failed although its final would have passed), and how faithful each
method's previews are on these seeds: their RMSE to the finals and the mean shift of their ink mass from the
finals' (the band is narrow, so a shift of a few thousandths moves borderline seeds across it). A model call is one
guided denoiser evaluation (conditional and unconditional batched, as ComfyUI does). The calibration is done
once per model, before the loop (``--calibrate-budget`` model calls on training seeds, the reference runs
included); under the table its cost is amortised over N prompts, with the break-even N against the best method that
needs no calibration.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...solver import load_coefficients
from ...solver.schedules import DiscreteSchedule
from ..testbeds import FASHION_BED, get_testbed, run_sigmas
from .calibrated import Refine, calibrate_bed
from .demo import coefficient_file
from .evaluator import sample_previews, solver_sampler
from .metrics import consistency_rmse
from .references import held_out_seeds, multistep_run, reference_sampler, seeded_batch
from .stock_samplers import sample_dpmpp_2m

FINAL_STEPS = 40
DEFAULT_FILE, CALIBRATED_FILE = "ConsistencySolver (default file)", "ConsistencySolver (calibrated)"
METHODS = (DEFAULT_FILE, CALIBRATED_FILE, "dpmpp_2m", "live preview", "no preview")
INK_BAND = (0.35, 0.65)
CALIBRATION_BUDGET = 3000


@dataclass
class Outcome:
    """One method's totals over all requests."""

    calls: int = 0
    good_finals: int = 0
    false_accepts: int = 0
    false_rejects: int = 0

    @property
    def calls_per_good_final(self) -> float:
        return self.calls / self.good_finals if self.good_finals else float("inf")


def simulate(method: str, preview_pass: Tensor, final_pass: Tensor, preview_steps: int) -> Outcome:
    """Walk one class's seeds in order; count calls up to the last good final (a request never left open)."""
    outcome, calls_since_success = Outcome(), 0
    for previewed, final in zip(preview_pass.tolist(), final_pass.tolist(), strict=True):
        if method == "no preview":
            calls, refined = FINAL_STEPS, True
        elif method == "live preview":
            calls, refined = (FINAL_STEPS if previewed else preview_steps), previewed
        else:
            calls, refined = preview_steps + (FINAL_STEPS if previewed else 0), previewed
        calls_since_success += calls
        if method != "no preview":
            outcome.false_accepts += int(previewed and not final)
            outcome.false_rejects += int(final and not previewed)
        if refined and final:
            outcome.good_finals += 1
            outcome.calls += calls_since_success
            calls_since_success = 0
    return outcome


def ink_mass(images: Tensor) -> Tensor:
    """The share of each image that is ink: its mean brightness in [0, 1] (Fashion-MNIST draws ink bright)."""
    return images.float().clamp(-1, 1).add(1).div(2).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class Fidelity:
    """A method's previews against their finals on the same seeds: RMSE, and the mean ink-mass shift (preview
    minus final), the statistic the artist's band judges."""

    rmse: float
    ink_shift: float


def fidelity(previews: Tensor, finals: Tensor) -> Fidelity:
    shift = (ink_mass(previews) - ink_mass(finals)).mean()
    return Fidelity(consistency_rmse(previews.cpu(), finals.cpu()), float(shift))


@dataclass(frozen=True)
class Artist:
    """The selective judge: the wanted class at ``threshold`` confidence, ink mass inside a band per class."""

    classifier: torch.nn.Module
    threshold: float
    ink_low: Tensor  # [classes]
    ink_high: Tensor

    @classmethod
    def fitted(cls, classifier: torch.nn.Module, threshold: float, finals: Tensor, labels: Tensor, band) -> Artist:
        """The ink band of each class: the ``band`` quantiles of that class's finals' ink mass."""
        mass = ink_mass(finals)
        classes = int(labels.max()) + 1
        low, high = torch.zeros(classes), torch.zeros(classes)
        for c in labels.unique().tolist():
            low[c], high[c] = torch.quantile(mass[labels == c], torch.tensor(band, dtype=mass.dtype))
        return cls(classifier, threshold, low, high)

    def accepts(self, images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            probabilities = self.classifier(images.float().clamp(-1, 1)).softmax(dim=1)
        confident = probabilities.gather(1, labels.unsqueeze(1)).squeeze(1) >= self.threshold
        mass = ink_mass(images)
        return confident & (mass >= self.ink_low[labels]) & (mass <= self.ink_high[labels])


def run(
    coefficients_path: Path | None,
    classes: list[int],
    seeds: int,
    thresholds: list[float],
    preview_steps: int,
    band: tuple[float, float],
    budget: int,
) -> tuple[dict[float, dict[str, Outcome]], dict[str, Fidelity], dict]:
    """Calibrate once, sample every preview and final once, then simulate the loop for each threshold."""
    from ..testbeds.fashion import load_classifier

    bed, classifier = get_testbed(FASHION_BED), load_classifier()
    final = Refine(reference_sampler, bed.sigmas(FINAL_STEPS), f"the {FINAL_STEPS}-step reference")
    calibration = calibrate_bed(bed, (preview_steps,), budget, refine=final)
    files = {
        DEFAULT_FILE: load_coefficients(coefficient_file(coefficients_path)),
        CALIBRATED_FILE: calibration.coefficients,
    }
    noise, _ = seeded_batch(bed, held_out_seeds(seeds) * len(classes))
    labels = torch.tensor([c for c in classes for _ in range(seeds)])
    live: dict[int, Tensor] = {}

    def keep_live_preview(info: dict) -> None:
        if info["i"] == preview_steps - 1:
            live[preview_steps] = info["denoised"]

    previews = {}
    with tqdm(total=4, desc="sampling", unit="run") as progress:
        for name, coefficients in files.items():
            # Each file on its learned schedule when it has one (dpmpp_2m keeps the bed's).
            sigmas = run_sigmas(bed, preview_steps, coefficients.schedule).float()
            solver = solver_sampler(coefficients, DiscreteSchedule())
            previews[name] = sample_previews(bed, solver, sigmas, noise, labels)
            progress.update(1)
        previews["dpmpp_2m"] = sample_previews(bed, sample_dpmpp_2m, bed.sigmas(preview_steps).float(), noise, labels)
        progress.update(1)
        finals = multistep_run(bed, noise, labels, FINAL_STEPS, callback=keep_live_preview)
        previews["live preview"] = live[preview_steps]
        progress.update(1)

    results = {}
    for threshold in thresholds:
        artist = Artist.fitted(classifier, threshold, finals, labels, band)
        results[threshold] = simulate_requests(artist, previews, finals, labels, len(classes), preview_steps)
    fidelities = {name: fidelity(images, finals) for name, images in previews.items()}
    return results, fidelities, {"model_calls": calibration.model_calls, "seconds": calibration.seconds}


def simulate_requests(
    artist: Artist,
    previews: dict[str, Tensor],
    finals: Tensor,
    labels: Tensor,
    classes: int,
    preview_steps: int,
) -> dict[str, Outcome]:
    """Judge every image and total the per-class simulations of every method."""
    seeds = len(labels) // classes
    final_pass = artist.accepts(finals, labels)
    passes = {name: artist.accepts(images, labels) for name, images in previews.items()}
    passes["no preview"] = final_pass
    totals = {method: Outcome() for method in METHODS}
    for k in range(classes):
        rows = slice(k * seeds, (k + 1) * seeds)
        for method in METHODS:
            outcome = simulate(method, passes[method][rows], final_pass[rows], preview_steps)
            total = totals[method]
            total.calls += outcome.calls
            total.good_finals += outcome.good_finals
            total.false_accepts += outcome.false_accepts
            total.false_rejects += outcome.false_rejects
    return totals


def table(
    totals: dict[str, Outcome],
    fidelities: dict[str, Fidelity],
    seeds: int,
    classes: int,
    threshold: float,
    preview_steps: int,
    band,
    calibration,
) -> str:
    baseline = totals["no preview"].calls_per_good_final
    lines = [
        f"Preview-loop simulation: {classes} classes x {seeds} held-out seeds, accepted = classifier confidence >= "
        f"{threshold} and ink mass within the {band[0]:.2f}-{band[1]:.2f} quantiles of the class's finals "
        f"({totals['no preview'].good_finals} requests met), {preview_steps}-step previews, {FINAL_STEPS}-step "
        f"finals. Calibration (once): {calibration['model_calls']} model calls, {calibration['seconds']:.0f} s.",
        "",
        "| preview method | model calls per accepted final | vs no preview | accepted finals | false accepts | "
        "false rejects | preview RMSE to final | ink-mass shift |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, outcome in totals.items():
        relative = outcome.calls_per_good_final / baseline - 1
        if method == "no preview":
            errors, faithful = ("—", "—"), ("—", "—")
        else:
            errors = (outcome.false_accepts, outcome.false_rejects)
            faithful = (f"{fidelities[method].rmse:.3f}", f"{fidelities[method].ink_shift:+.4f}")
        lines.append(
            f"| {method} | {outcome.calls_per_good_final:.1f} | {100 * relative:+.0f}% | {outcome.good_finals} | "
            f"{errors[0]} | {errors[1]} | {faithful[0]} | {faithful[1]} |"
        )
    return "\n".join([*lines, "", break_even(totals, calibration["model_calls"])])


def break_even(totals: dict[str, Outcome], calibration_calls: int) -> str:
    """The calibration is paid once per model: amortised over N prompts (one accepted final each), the calibrated
    previews' calls per final are theirs plus calibration_calls / N. The break-even N is where that meets the best
    method that needs no calibration."""
    calibrated = totals[CALIBRATED_FILE].calls_per_good_final
    best = min((m for m in totals if m != CALIBRATED_FILE), key=lambda m: totals[m].calls_per_good_final)
    saving = totals[best].calls_per_good_final - calibrated
    amortised = ", ".join(f"{calibrated + calibration_calls / n:.1f} at N = {n}" for n in (1, 10, 100, 1000))
    if saving <= 0:
        needs = totals[best].calls_per_good_final
        verdict = f"it never pays for itself here: {best} needs no more calls per final ({needs:.1f})"
    else:
        verdict = (
            f"it pays for itself after {math.ceil(calibration_calls / saving)} prompts (break-even N), against "
            f"{best} ({totals[best].calls_per_good_final:.1f} calls per final, {saving:.1f} more than calibrated)"
        )
    return (
        f"Calibration once per model ({calibration_calls} model calls), amortised over N prompts: calibrated previews "
        f"cost {amortised} model calls per accepted final; {verdict}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coefficients", type=Path, help="coefficient file (default: the bundled default-eps)")
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="Fashion-MNIST classes")
    parser.add_argument("--seeds", type=int, default=16, help="held-out seeds per class")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99], help="classifier probabilities to reach")
    parser.add_argument(
        "--ink-band", type=float, nargs=2, default=list(INK_BAND), help="quantiles of the class's ink mass to accept"
    )
    parser.add_argument("--preview-steps", type=int, default=6)
    parser.add_argument(
        "--calibrate-budget", type=int, default=CALIBRATION_BUDGET, help="model calls of the calibrated file"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # shared cores: one thread avoids contention
    band = tuple(args.ink_band)
    try:
        results, fidelities, calibration = run(
            args.coefficients,
            args.classes,
            args.seeds,
            args.thresholds,
            args.preview_steps,
            band,
            args.calibrate_budget,
        )
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from error
    for threshold, totals in results.items():
        print(
            table(totals, fidelities, args.seeds, len(args.classes), threshold, args.preview_steps, band, calibration)
            + "\n"
        )


if __name__ == "__main__":
    main()
