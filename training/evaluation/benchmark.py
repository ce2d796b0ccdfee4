"""Preview-consistency benchmark: every sampler a user could preview with, against the 40-step final.

    python -m consistency_solver.training.evaluation.benchmark [--quick | --defaults-only] [--beds NAME ...]
        [--out DIR] [--coefficients PATH ...]

For each test bed and held-out noise (seeds from ``references.HELD_OUT_SEED_START``), every row samples
at 4, 5, 6, 8, 10 and 12 steps and each cell shows the consistency RMSE to the reference final (40-step
"multistep" reference from the same noise and label) and a quality number (GMM beds: sliced W2 to true
samples; Fashion: the classifier's agreement with the label). Rows:

- ConsistencySolver with the bundled defaults (``solver/bundled/``) and every test-bed coefficient file
  (``training/testbeds/coefficients/``) whose model family fits the bed,
  plus ``--coefficients`` files; cells at step counts a policy was not trained for carry ``*``;
- the solver's presets (euler, ab2, ab3, ab4, ipndm);
- ComfyUI's own stock samplers, or "absent" rows when ComfyUI is not importable (then the project's
  dpmpp_2m reimplementation is added, labelled as such);
- ComfyUI's live preview: the denoised estimate after N steps of a 30-step dpmpp_2m run;
- for each bundled default with a learned schedule, every stock sampler on that schedule too (a user may pick the
  ``consistency_solver`` scheduler with any sampler).

A last table judges the defaults on each bed: on the stock schedule a user picks (the bed's: karras for EPS/V,
``simple`` for flow) and on their learned schedule, each against every stock sampler on the same schedule, as ratios
to the best of them, and to what users run today (dpmpp_2m on karras for EPS/V, euler on simple for flow).

``--defaults-only`` keeps the rows that table needs (the defaults and the stock samplers on each schedule) at 5
and 8 steps: the numbers of README's results summary (``summary``), in minutes rather than hours.

Then "steps to match" (the fewest ConsistencySolver steps at least as consistent as dpmpp_2m at 10 and at
20 steps) and the sampler overhead per step with a zero-cost denoiser. Tables go to stdout and
``OUT/benchmark.md``, numbers to ``OUT/results.json``, plots to ``OUT/<bed>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...solver import PRESET_NAMES, Preset, TableCoefficients, load_coefficients, model_kind
from ...solver.defaults import BUNDLED_DIR
from ...solver.schedules import DiscreteSchedule
from ..testbeds import COEFFICIENTS_DIR, FASHION_BEDS, TESTBED_NAMES, GMMTestBed, TestBed, get_testbed, run_sigmas
from . import stock_samplers
from .evaluator import Sampler, sample_previews, solver_sampler
from .metrics import consistency_rmse, frechet_distance, label_agreement, mode_tv, rmse_per_sample, sliced_wasserstein
from .references import held_out_seeds, reference_cache_dir, reference_finals, seeded_batch
from .stock_samplers import stock_name

STEP_COUNTS = (4, 5, 6, 8, 10, 12)
QUICK_STEP_COUNTS = (4, 6)
DEFAULTS_STEP_COUNTS = (5, 8)  # --defaults-only: the preview step counts every judgement reads
REFERENCE_STEPS = 40
LIVE_PREVIEW_STEPS = 30
MATCH_TARGETS = (10, 20)
MAX_MATCH_STEPS = 20
DEFAULT_BEDS = TESTBED_NAMES  # every bed: the trainer's acceptance is judged on all of them
QUICK_BEDS = ("gmm-vector-eps-cfg", "gmm-vector-flow-cfg")
# On the mixtures 1-4% of noises land in another mode at 5 steps and dominate the RMSE; 2048 noises pin that rate
# down (256 left it to a handful of noises). A mixture model call is a closed-form matmul, so they are cheap.
SAMPLES = {"gmm": 2048, "fashion": 64}
QUICK_SAMPLES = 16
OVERHEAD_LATENT = (1, 4, 64, 64)
FASHION_REAL_PER_SAMPLE = 8  # an SD1.5 512x512 latent
# The stock schedule a user picks for each model kind, which is the beds' default schedule (shift-3 linear is
# ComfyUI's simple whenever the step count divides 1000), and the sampler users pick today.
STOCK_SCHEDULE = {"eps": "karras", "flow": "simple"}
USERS_SAMPLER = {"eps": "dpmpp_2m", "flow": "euler"}
LEARNED_SCHEDULE = "consistency_solver"


@dataclass
class Row:
    """One sampler of a table: ``run(steps)`` returns its finals, or None where the row has no such cell;
    ``note(steps)`` marks a cell (``*``: untrained step count); ``run`` is None for an absent sampler."""

    label: str
    run: Callable[[int], Tensor | None] | None
    note: Callable[[int], str] = lambda steps: ""
    absent: str = ""


@dataclass
class BedResult:
    name: str
    quality_names: tuple[str, str]
    rows: dict[str, dict[int, tuple[float, float, float | None] | None]] = field(default_factory=dict)
    notes: dict[str, dict[int, str]] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    floors: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    quality_note: str = ""
    steps_to_match: dict[str, dict[int, int | None]] = field(default_factory=dict)
    match_notes: dict[str, dict[int, str]] = field(default_factory=dict)
    targets: dict[int, float] = field(default_factory=dict)
    # {judged file: {schedule name: (the file's row, the stock samplers' rows on that schedule)}}
    judged: dict[str, dict[str, tuple[str, list[str]]]] = field(default_factory=dict)
    kind: str = "eps"
    seconds: float = 0.0


class Quality:
    """The bed's two quality numbers.

    GMM beds: sliced W2 to true samples with the same labels, and the mode-histogram TV (both exact, no data).
    Fashion: the classifier's agreement with the label, and the Frechet distance in the classifier's features
    to class-matched real test images (``FASHION_REAL_PER_SAMPLE`` per sample), when the Debian data is installed;
    samples of a latent bed are decoded to images first.
    """

    def __init__(self, bed: TestBed, labels: Tensor | None, count: int):
        self.bed, self.labels = bed, labels
        self.targets = self.classifier = self.real_features = None
        self.note, self.floors = "", {}
        if isinstance(bed, GMMTestBed):
            self.names = ("sliced W2 to data", "mode TV")
            self.targets = bed.sample_data(labels, count, torch.Generator().manual_seed(0))
            self.floors["true data (sampling floor)"] = self(
                bed.sample_data(labels, count, torch.Generator().manual_seed(2))
            )
            return
        from ..testbeds.fashion import load_classifier, load_fashion_mnist

        self.names = ("label agreement", "FD_clf to test images")
        self.classifier = load_classifier()
        try:
            images, test_labels = load_fashion_mnist("test")
        except FileNotFoundError as error:
            self.note = f"FD_clf not computed: {error}"
            return
        reference, held_back = matched_real_images(images, test_labels, labels, FASHION_REAL_PER_SAMPLE)
        with torch.no_grad():
            self.real_features = self.classifier.features(reference)
        self.floors["real test images (sampling floor)"] = self.score_images(held_back)

    def __call__(self, samples: Tensor) -> tuple[float, float | None]:
        """The two numbers for samples in the bed's model space."""
        if self.targets is not None:
            return (
                sliced_wasserstein(samples, self.targets, torch.Generator().manual_seed(1)),
                mode_tv(samples, self.bed, self.labels),
            )
        return self.score_images(self.bed.decode(samples.float()))

    def score_images(self, images: Tensor) -> tuple[float, float | None]:
        """Fashion's two numbers for [N, 1, 28, 28] images."""
        images = images.float().clamp(-1, 1)
        with torch.no_grad():
            agreement = label_agreement(self.classifier(images), self.labels)
            if self.real_features is None:
                return agreement, None
            return agreement, frechet_distance(self.classifier.features(images), self.real_features)


def matched_real_images(images: Tensor, image_labels: Tensor, labels: Tensor, per_sample: int) -> tuple[Tensor, Tensor]:
    """Real images with the class mix of ``labels``: ``per_sample`` per label for the statistics, and a disjoint
    set with one image per sample, in the samples' order (so label agreement applies to it: the sampling floor)."""
    pools = {int(label): images[image_labels == label] for label in labels.unique()}
    counts = {label: int((labels == label).sum()) for label in pools}
    reference = torch.cat([pools[label][: per_sample * counts[label]] for label in sorted(pools)])
    taken = dict.fromkeys(pools, 0)
    held_back = []
    for label in labels.tolist():
        held_back.append(pools[label][per_sample * counts[label] + taken[label]])
        taken[label] += 1
    return reference, torch.stack(held_back)


def coefficient_files(extra: list[Path]) -> list[Path]:
    shipped = [*BUNDLED_DIR.glob("*.safetensors"), *COEFFICIENTS_DIR.glob("*.safetensors")]
    return sorted(shipped, key=lambda path: path.name) + list(extra)


def sampler_row(
    label: str,
    bed: TestBed,
    sampler: Sampler,
    schedule: Callable[[int], Tensor],
    noise: Tensor,
    labels: Tensor | None,
    note: Callable[[int], str] = lambda steps: "",
    untrained_is_empty: bool = False,
) -> Row:
    """A row whose cell at N steps holds ``sampler``'s previews on ``schedule(N)``. With ``untrained_is_empty`` a
    step count the coefficients or their learned schedule lack is an empty cell instead of an error."""

    def run(steps: int) -> Tensor | None:
        try:
            return sample_previews(bed, sampler, schedule(steps).float(), noise, labels)
        except ValueError:
            if untrained_is_empty:
                return None
            raise

    return Row(label, run, note)


def solver_label(path: Path, schedule: str | None) -> str:
    """The row of a coefficient file: on its learned schedule (``learned``), the bed's (``bed's``), or its only one."""
    return (
        f"ConsistencySolver ({path.stem})"
        if schedule is None
        else f"ConsistencySolver ({path.stem}, {schedule} schedule)"
    )


def consistency_rows(bed: TestBed, noise: Tensor, labels: Tensor | None, files: list[Path]) -> list[Row]:
    """One row per coefficient file whose model family fits the bed (``any`` or the bed's eps/flow kind); two
    for a file with a learned schedule: on it, and on the bed's default schedule."""
    rows = []
    # Timestep-conditioned policies need a sigma -> timestep map; SD1.5's is the eps beds' schedule range.
    model_sampling = DiscreteSchedule() if bed.kind == "eps" else None
    for path in files:
        coefficients = load_coefficients(path, allow_untrained_steps=True)
        if model_kind(coefficients.metadata["model_family"]) not in (bed.kind, "any"):
            continue
        if isinstance(coefficients, TableCoefficients):
            trained = set(coefficients.tables)
        else:
            trained = set(coefficients.trained_steps)

        def note(steps: int, trained=trained) -> str:
            return "" if steps in trained else "*"

        def row(label: str, schedule: Callable[[int], Tensor], coefficients=coefficients, note=note) -> Row:
            sampler = solver_sampler(coefficients, model_sampling)
            return sampler_row(label, bed, sampler, schedule, noise, labels, note, untrained_is_empty=True)

        if coefficients.schedule is None:
            rows.append(row(solver_label(path, None), bed.sigmas))
            continue
        # A file with a learned schedule, on it (the consistency_solver scheduler) and on the bed's default
        # schedule (the file picked with a stock scheduler), which its weights were not trained for.
        learned = functools.partial(run_sigmas, bed, schedule=coefficients.schedule)
        rows.append(row(solver_label(path, "learned"), learned))
        rows.append(row(solver_label(path, "bed's"), bed.sigmas))
    return rows


def preset_rows(bed: TestBed, noise: Tensor, labels: Tensor | None) -> list[Row]:
    return [
        sampler_row(f"preset {name}", bed, solver_sampler(Preset(name)), bed.sigmas, noise, labels)
        for name in PRESET_NAMES
    ]


def stock_rows(
    bed: TestBed,
    noise: Tensor,
    labels: Tensor | None,
    schedule: Callable[[int], Tensor] | None = None,
    suffix: str = "",
) -> list[Row]:
    """Every stock sampler on ``schedule`` (default: the bed's), labelled ``ComfyUI <name><suffix>``. A step count
    the schedule lacks (a learned schedule asked for one step more by uni_pc) is an empty cell."""
    reason = stock_samplers.comfy_unavailable_reason()
    absent = (
        []
        if reason is None
        else [Row(f"ComfyUI {name}{suffix}", None, absent=reason) for name in stock_samplers.STOCK_SAMPLERS]
    )
    comparison = stock_samplers.stock_comparison(bed.sigmas if schedule is None else schedule)
    return [
        *absent,
        *(
            sampler_row(label + suffix, bed, sampler, sigmas, noise, labels, untrained_is_empty=schedule is not None)
            for label, (sampler, sigmas) in comparison.items()
        ),
    ]


def judged_rows(bed: TestBed, noise: Tensor, labels: Tensor | None, files: list[Path], result: BedResult) -> list[Row]:
    """Every stock sampler on the learned schedule of each of ``files`` that fits the bed, and which rows judge each
    file on each schedule (``result.judged``)."""
    rows = []
    stock_labels = list(stock_samplers.stock_comparison(bed.sigmas))
    for path in files:
        coefficients = load_coefficients(path, allow_untrained_steps=True)
        if model_kind(coefficients.metadata["model_family"]) not in (bed.kind, "any"):
            continue
        stock_schedule = STOCK_SCHEDULE[bed.kind]
        if coefficients.schedule is None:
            result.judged[path.stem] = {stock_schedule: (solver_label(path, None), stock_labels)}
            continue
        suffix = f" ({path.stem}'s learned schedule)"
        learned = functools.partial(run_sigmas, bed, schedule=coefficients.schedule)
        rows += stock_rows(bed, noise, labels, learned, suffix)
        result.judged[path.stem] = {
            stock_schedule: (solver_label(path, "bed's"), stock_labels),
            LEARNED_SCHEDULE: (solver_label(path, "learned"), [label + suffix for label in stock_labels]),
        }
    return rows


def live_preview_row(bed: TestBed, noise: Tensor, labels: Tensor | None) -> Row:
    """The denoised estimate at step N of a 30-step dpmpp_2m run: what ComfyUI's latent preview shows."""
    sampler, label = stock_samplers.dpmpp_2m()
    sigmas = bed.sigmas(LIVE_PREVIEW_STEPS).float()
    denoised: dict[int, Tensor] = {}

    def keep(info: dict) -> None:
        denoised[info["i"] + 1] = info["denoised"]

    def run(steps: int) -> Tensor:
        if not denoised:
            sample_previews(bed, sampler, sigmas, noise, labels, callback=keep)
        return denoised[steps]

    return Row(f"live preview ({label}, {LIVE_PREVIEW_STEPS}-step run)", run)


def bed_samples(name: str, quick: bool) -> int:
    if quick:
        return QUICK_SAMPLES
    return SAMPLES["fashion"] if name in FASHION_BEDS else SAMPLES["gmm"]


def evaluate_bed(
    bed: TestBed,
    count: int,
    step_counts: tuple[int, ...],
    files: list[Path],
    match: bool,
    log,
    judged: list[Path] | None = None,
    judged_only: bool = False,
) -> BedResult:
    """The bed's table: ``files`` on their schedules, the presets, the stock samplers and the live preview, and the
    stock samplers on the learned schedule of each ``judged`` file. ``judged_only`` keeps the rows that judge those
    files only (the files and the stock samplers), as the leave-one-bed-out protocol needs."""
    started = time.perf_counter()
    noise, labels = seeded_batch(bed, held_out_seeds(count))
    references = reference_finals(
        bed, noise, labels, method="multistep", steps=REFERENCE_STEPS, cache_dir=reference_cache_dir()
    )
    quality = Quality(bed, labels, count)
    result = BedResult(bed.name, quality.names, quality_note=quality.note, kind=bed.kind)
    result.floors = {f"{REFERENCE_STEPS}-step reference": quality(references), **quality.floors}

    solver_rows = consistency_rows(bed, noise, labels, files)
    judging = judged_rows(bed, noise, labels, judged or [], result)
    if judged_only:
        rows = [*solver_rows, *stock_rows(bed, noise, labels), *judging]
    else:
        rows = [*solver_rows, *preset_rows(bed, noise, labels), *stock_rows(bed, noise, labels), *judging]
        rows.append(live_preview_row(bed, noise, labels))
    cache: dict[tuple[str, int], float | None] = {}
    for row in rows:
        log(f"  {bed.name}: {row.label}")
        if row.run is None:
            result.absent[row.label] = row.absent
            continue
        result.rows[row.label], result.notes[row.label] = {}, {}
        for steps in step_counts:
            finals = row.run(steps)
            if finals is None:
                result.rows[row.label][steps] = None
                continue
            rmse = consistency_rmse(finals, references)
            cache[row.label, steps] = rmse
            # The median next to the RMSE: on the mixtures a few noises near a mode boundary dominate the RMSE.
            median = float(rmse_per_sample(finals, references).median())
            result.rows[row.label][steps] = (rmse, *quality(finals), median)
            result.notes[row.label][steps] = row.note(steps)

    if match:
        steps_to_match(rows, solver_rows, references, cache, result)
    result.seconds = time.perf_counter() - started
    return result


def steps_to_match(rows: list[Row], solver_rows: list[Row], references: Tensor, cache: dict, result: BedResult) -> None:
    """Fewest ConsistencySolver steps whose RMSE is at most dpmpp_2m's at 10 and at 20 steps."""
    _, dpm_label = stock_samplers.dpmpp_2m()  # the stock row's label, ComfyUI's or the reimplementation's
    dpm_row = next(row for row in rows if row.label == dpm_label)
    for target in MATCH_TARGETS:
        if (dpm_label, target) not in cache:
            cache[dpm_label, target] = consistency_rmse(dpm_row.run(target), references)
        result.targets[target] = cache[dpm_label, target]
    for row in solver_rows:
        found: dict[int, int | None] = {}
        notes: dict[int, str] = {}
        for target in MATCH_TARGETS:
            found[target] = None
            for steps in range(2, MAX_MATCH_STEPS + 1):
                if (row.label, steps) not in cache:
                    finals = row.run(steps)
                    cache[row.label, steps] = None if finals is None else consistency_rmse(finals, references)
                rmse = cache[row.label, steps]
                if rmse is not None and rmse <= result.targets[target]:
                    found[target] = steps
                    notes[target] = row.note(steps)
                    break
            if found[target] is None:  # a table stops at its largest step count, a policy goes on to the limit
                runnable = [steps for steps in range(2, MAX_MATCH_STEPS + 1) if cache[row.label, steps] is not None]
                notes[target] = f"> {max(runnable)}" if runnable else "no cells"
        result.steps_to_match[row.label], result.match_notes[row.label] = found, notes


def sampler_overhead(files: list[Path], repeats: int) -> dict[str, float]:
    """Seconds per step with a zero-cost denoiser (it returns a stored tensor) on an SD1.5-sized latent."""
    x = torch.randn(OVERHEAD_LATENT, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros_like(x)
    sigmas = get_testbed("gmm-vector-eps").sigmas(LIVE_PREVIEW_STEPS).float()
    model_sampling = DiscreteSchedule()
    coefficients, solver_label = Preset("ab4"), "ConsistencySolver (preset ab4)"
    for path in files:  # the first eps file that can run 30 steps; a table may hold other step counts only
        candidate = load_coefficients(path, allow_untrained_steps=True)
        if model_kind(candidate.metadata["model_family"]) == "flow":
            continue
        try:
            candidate.weights(sigmas, model_sampling.timestep)
        except ValueError:
            continue
        coefficients, solver_label = candidate, f"ConsistencySolver ({path.stem})"
        break
    dpm_sampler, dpm_label = stock_samplers.dpmpp_2m()

    def zero_cost(x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        return zeros

    timings = {}
    for label, sampler in ((solver_label, solver_sampler(coefficients, model_sampling)), (dpm_label, dpm_sampler)):
        sampler(zero_cost, x, sigmas, disable=True)  # warm-up
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            sampler(zero_cost, x, sigmas, disable=True)
            seconds.append(time.perf_counter() - started)
        timings[label] = statistics.median(seconds) / LIVE_PREVIEW_STEPS
    return timings


def format_quality(values: tuple[float, float | None], names: tuple[str, str]) -> str:
    primary, secondary = values
    shown = f"{100 * primary:.0f}%" if names[0] == "label agreement" else f"{primary:.3f}"
    if secondary is None:
        return shown
    return f"{shown} / {secondary:.1f}" if names[1].startswith("FD") else f"{shown} / {secondary:.2f}"


def format_cell(value: tuple[float, float, float | None, float] | None, note: str, names: tuple[str, str]) -> str:
    if value is None:
        return "—"
    return f"{value[0]:.3f}{note} ({value[3]:.3f}) / {format_quality(value[1:3], names)}"


def bed_table(result: BedResult, step_counts: tuple[int, ...]) -> str:
    lines = [
        f"### {result.name}",
        "",
        f"Cells: consistency RMSE to the {REFERENCE_STEPS}-step final (median per-sample RMSE) / "
        f"{' / '.join(result.quality_names)}.",
        "",
        "| sampler | " + " | ".join(f"{steps} steps" for steps in step_counts) + " |",
        "|---|" + "---|" * len(step_counts),
    ]
    for label, cells in result.rows.items():
        notes = result.notes[label]
        row = [format_cell(cells[steps], notes.get(steps, ""), result.quality_names) for steps in step_counts]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    for label, reason in result.absent.items():
        lines.append(f"| {label} | absent ({reason}) |" + " |" * (len(step_counts) - 1))
    lines.append("")
    floors = ", ".join(
        f"{name}: {format_quality(value, result.quality_names)}" for name, value in result.floors.items()
    )
    lines.append(f"Quality floors ({' / '.join(result.quality_names)}): {floors}.")
    if result.quality_note:
        lines.append(result.quality_note)
    all_notes = [*result.notes.values(), *result.match_notes.values()]
    if any("*" in note for notes in all_notes for note in notes.values()):
        lines.append("`*`: a step count the policy was not trained for.")
    if result.steps_to_match:
        targets = ", ".join(f"{result.targets[t]:.3f} at {t} steps" for t in MATCH_TARGETS)
        lines += ["", f"Steps to match dpmpp_2m (its RMSE: {targets}):", ""]
        lines += ["| coefficients | " + " | ".join(f"match {t}-step dpmpp_2m" for t in MATCH_TARGETS) + " |"]
        lines += ["|---|" + "---|" * len(MATCH_TARGETS)]
        for label, found in result.steps_to_match.items():
            notes = result.match_notes[label]
            cells = [f"{found[t]}{notes[t]}" if found[t] is not None else notes[t] for t in MATCH_TARGETS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\n({result.seconds:.0f} s)\n")
    return "\n".join(lines)


@dataclass(frozen=True)
class Judgement:
    """A judged file at one step count on one schedule, against the stock samplers on the same schedule."""

    rmse: float
    best_stock: str  # the stock sampler's name (euler, dpmpp_2m, ...)
    best_stock_rmse: float
    users_rmse: float | None  # USERS_SAMPLER on the stock schedule, what users run today; None: no such cell

    @property
    def to_best(self) -> float:
        return self.rmse / self.best_stock_rmse

    @property
    def to_users(self) -> float | None:
        return None if self.users_rmse is None else self.rmse / self.users_rmse


def judgements(result: BedResult, stem: str) -> dict[str, dict[int, Judgement]]:
    """{schedule: {steps: Judgement}} of the judged file ``stem`` on ``result``'s bed, at every step count where it
    and a stock sampler have a cell: against the best stock sampler on the same schedule, and against the sampler
    users pick today on the stock schedule they pick (what they run today)."""

    def stock_cells(labels: list[str], steps: int) -> dict[str, float]:
        cells = {label: result.rows[label].get(steps) for label in labels if label in result.rows}
        return {label: value[0] for label, value in cells.items() if value is not None}

    today = result.judged[stem][STOCK_SCHEDULE[result.kind]][1]
    judged = {}
    for schedule, (row, stock) in result.judged[stem].items():
        cells = {}
        for steps, cell in result.rows[row].items():
            same_schedule = stock_cells(stock, steps)
            if cell is None or not same_schedule:
                continue
            best = min(same_schedule, key=same_schedule.get)
            users = [
                v for label, v in stock_cells(today, steps).items() if stock_name(label) == USERS_SAMPLER[result.kind]
            ]
            cells[steps] = Judgement(cell[0], stock_name(best), same_schedule[best], users[0] if users else None)
        judged[schedule] = cells
    return judged


def judgement_table(results: dict[str, BedResult]) -> str:
    """One table of every judged file on every bed: its RMSE on each schedule beside the best stock sampler's and
    the users' sampler's on the same schedule, and the ratios."""
    lines = [
        "### The defaults on each bed",
        "",
        "RMSE to the final. Ratios: to the best stock sampler on the same schedule, and to what users run today: "
        f"{USERS_SAMPLER['eps']} on {STOCK_SCHEDULE['eps']} for EPS/V, {USERS_SAMPLER['flow']} on "
        f"{STOCK_SCHEDULE['flow']} for flow.",
        "",
        "| bed | file | steps | schedule | file's RMSE | best stock sampler on it | x best | users' sampler today | "
        "x users' |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for stem in result.judged:
            for schedule, cells in judgements(result, stem).items():
                for steps, cell in cells.items():
                    users = USERS_SAMPLER[result.kind]
                    users_cell = "—" if cell.users_rmse is None else f"{cell.users_rmse:.3f} {users}"
                    to_users = "—" if cell.to_users is None else f"{cell.to_users:.2f}x"
                    lines.append(
                        f"| {name} | {stem} | {steps} | {schedule} | {cell.rmse:.3f} | {cell.best_stock_rmse:.3f} "
                        f"{cell.best_stock} | {cell.to_best:.2f}x | {users_cell} | {to_users} |"
                    )
    return "\n".join(lines) + "\n"


def plot_bed(result: BedResult, step_counts: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, cells in result.rows.items():
        steps = [n for n in step_counts if cells.get(n) is not None]
        style = "-o" if label.startswith("ConsistencySolver") else "--." if label.startswith("preset") else ":x"
        left.plot(steps, [cells[n][0] for n in steps], style, label=label, linewidth=2 if style == "-o" else 1)
        right.plot(steps, [cells[n][1] for n in steps], style, label=label, linewidth=2 if style == "-o" else 1)
    left.set(title=f"{result.name}: consistency", xlabel="steps", ylabel=f"RMSE to {REFERENCE_STEPS}-step final")
    left.set_yscale("log")
    right.set(title=f"{result.name}: quality", xlabel="steps", ylabel=result.quality_names[0])
    for name, (value, _) in result.floors.items():
        right.axhline(value, color="grey", linewidth=0.8, linestyle="-.")
        right.annotate(name, (step_counts[0], value), fontsize=7, color="grey")
    left.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine() -> str:
    """The machine a run was timed on, in words: CPU model, cores, threads used, torch, ComfyUI's samplers or not."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    comfy = "ComfyUI's samplers absent" if stock_samplers.comfy_unavailable_reason() else "ComfyUI's own samplers"
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) used, torch {torch.__version__}, {comfy}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small beds, 16 samples, 4 and 6 steps (seconds)")
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="judge the bundled defaults (and --coefficients files) alone at 5 and 8 steps: their rows and every "
        "stock sampler on each schedule, no presets, live preview or other files (minutes a learned bed)",
    )
    parser.add_argument("--beds", nargs="+", help=f"test beds (default: {' '.join(DEFAULT_BEDS)})")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"), help="folder for tables and plots")
    parser.add_argument("--coefficients", type=Path, nargs="*", default=[], help="extra coefficient files to rank")
    parser.add_argument(
        "--samples",
        type=int,
        help=f"held-out noises per bed (default: {SAMPLES['gmm']} GMM, {SAMPLES['fashion']} Fashion)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # shared cores: one thread avoids contention; the beds are small
    step_counts = QUICK_STEP_COUNTS if args.quick else DEFAULTS_STEP_COUNTS if args.defaults_only else STEP_COUNTS
    beds = args.beds or (QUICK_BEDS if args.quick else DEFAULT_BEDS)
    defaults = sorted(BUNDLED_DIR.glob("*.safetensors"))
    files = [*defaults, *args.coefficients] if args.defaults_only else coefficient_files(args.coefficients)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    arguments = sys.argv[1:] if argv is None else argv
    command = "python -m consistency_solver.training.evaluation.benchmark " + " ".join(arguments)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        f"## Benchmark\n\n`{command.strip()}`\n",
        f"Run {started} on {machine()}.\n",
        f"Coefficient files: {', '.join(path.name for path in files) or 'none'}\n",
    ]
    results = {}
    for name in beds:
        log(f"{name} ...")
        try:
            bed = get_testbed(name)
        except (FileNotFoundError, ImportError) as error:
            sections.append(f"### {name}\n\nskipped: {error}\n")
            log(f"  skipped: {error}")
            continue
        count = args.samples or bed_samples(name, args.quick)
        result = evaluate_bed(
            bed,
            count,
            step_counts,
            files,
            match=not (args.quick or args.defaults_only),
            log=log,
            judged=defaults,
            judged_only=args.defaults_only,
        )
        results[name] = result
        sections.append(f"{count} held-out noises.\n\n" + bed_table(result, step_counts))
        plot_bed(result, step_counts, args.out / f"{name}.png")
        print(sections[-1], flush=True)

    sections.append(judgement_table(results))
    print(sections[-1], flush=True)
    timings = sampler_overhead(files, repeats=3 if args.quick else 20)
    (solver_label, solver_time), (dpm_label, dpm_time) = timings.items()
    overhead = (
        f"### Sampler overhead\n\nZero-cost denoiser, {LIVE_PREVIEW_STEPS} steps on a {list(OVERHEAD_LATENT)} latent: "
        f"{solver_label} {1e6 * solver_time:.0f} µs/step, {dpm_label} {1e6 * dpm_time:.0f} µs/step, "
        f"ratio {solver_time / dpm_time:.2f}.\n"
    )
    sections.append(overhead)
    print(overhead, flush=True)
    (args.out / "benchmark.md").write_text("\n".join(sections))
    payload = {
        name: {
            "quality": result.quality_names,
            "rows": {label: {str(n): cell for n, cell in cells.items()} for label, cells in result.rows.items()},
            "absent": result.absent,
            "floors": result.floors,
            "steps_to_match": result.steps_to_match,
            "dpmpp_2m_rmse": result.targets,
            "defaults": {
                stem: {
                    schedule: {str(n): dataclasses.asdict(cell) for n, cell in cells.items()}
                    for schedule, cells in judgements(result, stem).items()
                }
                for stem in result.judged
            },
        }
        for name, result in results.items()
    }
    payload["overhead_seconds_per_step"] = timings
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    log(f"wrote {args.out / 'benchmark.md'}, {args.out / 'results.json'} and plots")


if __name__ == "__main__":
    main()
