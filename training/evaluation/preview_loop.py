"""The paper's user study, simulated: how many model calls does an artist spend per good image?

    python -m consistency_solver.training.evaluation.preview_loop [--coefficients PATH] [--thresholds 0.9 0.99]
        [--seeds 16]

The artist wants an image of class c that the shipped Fashion-MNIST classifier (standing in for the
artist's judgement) assigns to c with probability >= ``threshold``. Going through seeds in order, with
each preview method the artist:

- ConsistencySolver / dpmpp_2m preview: samples an N-step preview (N calls); if it passes, refines it
  with the 40-step run from the same noise (40 more calls) and checks the final;
- live preview: starts the 40-step refine run and looks at its denoised estimate after N steps; a
  failing preview aborts the run (N calls), a passing one lets it finish (40 calls in all);
- no preview: runs the full 40 steps for every seed.

A request ends at the first final that passes; then the next request starts at the next seed. Reported per
method: mean model calls per good final, good finals, false accepts (the preview passed, its final
failed) and false rejects (the preview failed although its final would have passed). A model call is one
guided denoiser evaluation (conditional and unconditional batched, as ComfyUI does).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...solver import load_coefficients
from ...solver.schedules import DiscreteSchedule
from ..testbeds import FASHION_BED, get_testbed, run_sigmas
from .demo import coefficient_file
from .evaluator import sample_previews, solver_sampler
from .references import held_out_seeds, multistep_run, seeded_batch
from .stock_samplers import sample_dpmpp_2m

FINAL_STEPS = 40
METHODS = ("ConsistencySolver", "dpmpp_2m", "live preview", "no preview")


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


def judge(classifier: torch.nn.Module, images: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Does the classifier give the wanted class a probability of at least ``threshold``?"""
    with torch.no_grad():
        probabilities = classifier(images.float().clamp(-1, 1)).softmax(dim=1)
    return probabilities.gather(1, labels.unsqueeze(1)).squeeze(1) >= threshold


def run(
    coefficients_path: Path | None, classes: list[int], seeds: int, thresholds: list[float], preview_steps: int
) -> dict[float, dict[str, Outcome]]:
    """Sample every preview and final once, then simulate the loop for each threshold."""
    from ..testbeds.fashion import load_classifier

    coefficients = load_coefficients(coefficient_file(coefficients_path))
    bed, classifier = get_testbed(FASHION_BED), load_classifier()
    noise, _ = seeded_batch(bed, held_out_seeds(seeds) * len(classes))
    labels = torch.tensor([c for c in classes for _ in range(seeds)])
    sigmas = bed.sigmas(preview_steps).float()
    # The solver runs on its file's learned schedule when it has one (dpmpp_2m keeps the bed's).
    solver_sigmas = run_sigmas(bed, preview_steps, coefficients.schedule).float()
    live: dict[int, Tensor] = {}

    def keep_live_preview(info: dict) -> None:
        if info["i"] == preview_steps - 1:
            live[preview_steps] = info["denoised"]

    with tqdm(total=3, desc="sampling", unit="run") as progress:
        solver = solver_sampler(coefficients, DiscreteSchedule())
        previews = {"ConsistencySolver": sample_previews(bed, solver, solver_sigmas, noise, labels)}
        progress.update(1)
        previews["dpmpp_2m"] = sample_previews(bed, sample_dpmpp_2m, sigmas, noise, labels)
        progress.update(1)
        finals = multistep_run(bed, noise, labels, FINAL_STEPS, callback=keep_live_preview)
        previews["live preview"] = live[preview_steps]
        progress.update(1)

    return {
        threshold: simulate_requests(classifier, previews, finals, labels, threshold, len(classes), preview_steps)
        for threshold in thresholds
    }


def simulate_requests(
    classifier: torch.nn.Module,
    previews: dict[str, Tensor],
    finals: Tensor,
    labels: Tensor,
    threshold: float,
    classes: int,
    preview_steps: int,
) -> dict[str, Outcome]:
    """Judge every image at ``threshold`` and total the per-class simulations of every method."""
    seeds = len(labels) // classes
    final_pass = judge(classifier, finals, labels, threshold)
    passes = {name: judge(classifier, images, labels, threshold) for name, images in previews.items()}
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


def table(totals: dict[str, Outcome], seeds: int, classes: int, threshold: float, preview_steps: int) -> str:
    baseline = totals["no preview"].calls_per_good_final
    lines = [
        f"Preview-loop simulation: {classes} classes x {seeds} held-out seeds, classifier threshold {threshold}, "
        f"{preview_steps}-step previews, {FINAL_STEPS}-step finals.",
        "",
        "| preview method | model calls per good final | vs no preview | good finals | false accepts | false rejects |",
        "|---|---|---|---|---|---|",
    ]
    for method, outcome in totals.items():
        relative = outcome.calls_per_good_final / baseline - 1
        errors = ("—", "—") if method == "no preview" else (outcome.false_accepts, outcome.false_rejects)
        lines.append(
            f"| {method} | {outcome.calls_per_good_final:.1f} | {100 * relative:+.0f}% | {outcome.good_finals} | "
            f"{errors[0]} | {errors[1]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coefficients", type=Path, help="coefficient file (default: the bundled default-eps)")
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="Fashion-MNIST classes")
    parser.add_argument("--seeds", type=int, default=16, help="held-out seeds per class")
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.9, 0.99], help="classifier probabilities to reach"
    )
    parser.add_argument("--preview-steps", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # shared cores: one thread avoids contention
    try:
        results = run(args.coefficients, args.classes, args.seeds, args.thresholds, args.preview_steps)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from error
    for threshold, totals in results.items():
        print(table(totals, args.seeds, len(args.classes), threshold, args.preview_steps) + "\n")


if __name__ == "__main__":
    main()
