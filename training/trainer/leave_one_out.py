"""The defaults' protocol: candidates judged on learned beds they never saw, and the rule that picks the shipped one.

    python -m consistency_solver.training.trainer.leave_one_out --family eps --previous b221ec4 --candidate 46ececd

A default meets checkpoints it never saw, so a candidate is judged by what it gives on a learned bed it was not
trained on. The candidates: the previously shipped file (``--previous``, a git revision or a path; by default the file
at ``--output`` when the run starts), any other file (``--candidate``, repeatable: a git revision, whose
``solver/bundled/default-<family>.safetensors`` is taken, or a path), and the recipes (``--recipe``, repeatable,
``NAME=FLAGS``; by default the family's, ``RECIPES[family]``), each of which the protocol trains on every bed of the
family. For each candidate and each learned bed of the family, the file that did not see the bed: a file not trained
on it as it is; for a file trained on it, the command recorded in the file with that bed left out (a fold; a recipe
has one for every learned bed). The benchmark's evaluator judges those files on the bed left out, and each
candidate's own file on every bed of the family (mixtures included), at ``STEP_COUNTS`` on the family's stock schedule
(karras for EPS/V, simple for flow) and on the file's learned schedule, each against the best of every stock
ComfyUI sampler as users run it (on the family's stock schedule), on held-out noises.

The choice rule (``RULE``), in this order:

(a) on every learned bed left out, no cell (step count x schedule) worse than the previously shipped file's (on the
    bed left out too) by more than ``NO_WORSE``;
(b) on every bed, mixtures included, a step count's preview never worse than a smaller count's (``MONOTONE_STEPS``),
    for the file left out on each learned bed and for the candidate's own file on every bed;
(c) then the lowest mean ratio to the best stock sampler over the learned beds left out (every cell).

A candidate that passes (a) and (b) beats one that does not; among equals (c) decides. The chosen file is written to
``--output`` with the verdict in its ``training`` metadata (``choice``). The Gaussian mixtures check the math; they
are judged on (b) only, and their ratios are information. Tables go to stdout and ``OUT/defaults_<family>.md``,
numbers to ``OUT/defaults_<family>.json``; results are cached per file content in ``OUT/<family>/cells.json`` and a
fold whose file records the same command is not trained again, so a run that stopped picks up where it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ...solver.defaults import BUNDLED_DIR
from ...solver.files import write_safetensors
from ..evaluation import benchmark, stock_samplers
from ..evaluation.metrics import consistency_rmse, rmse_per_sample
from ..evaluation.references import held_out_seeds, reference_cache_dir, reference_finals, seeded_batch
from ..testbeds import GMM_BEDS, TESTBED_NAMES, get_testbed
from . import cli

FAMILIES = ("eps", "flow")
REPOSITORY = Path(__file__).resolve().parents[2]
STEP_COUNTS = benchmark.STEP_COUNTS  # 4, 5, 6, 8, 10, 12
MONOTONE_STEPS = (5, 6, 8, 10, 12)
NO_WORSE = 1.03
RULE = (
    f"(a) on every learned bed left out, no cell (steps {', '.join(map(str, STEP_COUNTS))} x the family's stock "
    f"schedule and the file's learned schedule) worse than the previously shipped file's by more than "
    f"{100 * (NO_WORSE - 1):.0f} %; (b) on every bed, mixtures included, a count's preview never worse than a smaller "
    f"count's ({' -> '.join(map(str, MONOTONE_STEPS))} steps, both schedules); (c) then the lowest mean ratio to the "
    "best stock sampler over the learned beds left out"
)
# Issue 21's acceptance for a learned bed left out: at most this times the best stock sampler (on the stock schedule).
ACCEPTANCE = {"learned": {5: 0.85, 8: 1.0}, "stock": {5: 1.0, 8: 1.1}}
# The recipe of a trained default: the trainer's flags besides --bed and --output. The learned beds' batches hold 4
# noises (their calls are costly), the mixtures' 64 of 4096 (to see the rare noises near a mode boundary); the
# mixtures get half the batches for EPS and three quarters for flow; the flow default's step to sigma 0 returns the
# denoised estimate (README, "Defaults that travel").
COMMON = (
    "--mode direct --schedule learned --steps 4-12 --form policy --lr-schedule cosine --updates 250 --batch 4 "
    "--mixture-batch 64 --train-count 128 --mixture-train-count 4096 --held-out-count 64 --report-steps 5,8"
)
RECIPES = {
    "eps": f"{COMMON} --mixture-share 0.5 --lr 5e-3",
    "flow": f"{COMMON} --mixture-share 0.75 --lr 1e-2 --last-step denoised",
}
RECIPE = "recipe"
PREVIOUS = "previous"
# Flags of a recorded trainer command that say where it wrote, not what it trained.
_RUN_FLAGS = {"--output": 1, "--checkpoint": 1, "--report-dir": 1, "--threads": 1, "--no-progress": 0}
_TRAINER = ["python", "-m", "consistency_solver.training"]


def family_beds(family: str) -> tuple[list[str], list[str]]:
    """(learned beds, mixture beds) whose model kind is ``family``; the learned ones each load their weights."""
    beds = [name for name in TESTBED_NAMES if get_testbed(name).kind == family]
    return [name for name in beds if name not in GMM_BEDS], [name for name in beds if name in GMM_BEDS]


def typed(path: Path) -> str:
    """``path`` as a user types it: relative to the current folder when it lies inside it, else absolute. The file
    records the trainer's command line, so run from the repository root, the shipped default's metadata holds a
    command that remakes it there (``--output solver/bundled/...``), not this machine's absolute paths."""
    path = path.absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def training_record(path: Path) -> dict:
    with safe_open(str(path), "pt") as opened:
        return json.loads((opened.metadata() or {}).get("training") or "{}")


def recorded_recipe(path: Path) -> tuple[str, list[str]]:
    """(the trainer flags besides the beds and where it wrote, the beds) of the command recorded in a file."""
    words = shlex.split(training_record(path).get("command", ""))
    if words[:3] != _TRAINER:
        raise SystemExit(f"error: {path} records no trainer command, so its folds cannot be made; give another file")
    flags, beds, i = [], [], 3
    while i < len(words):
        if words[i] == "--bed":
            beds.append(words[i + 1])
            i += 2
        elif words[i] in _RUN_FLAGS:
            i += 1 + _RUN_FLAGS[words[i]]
        else:
            flags.append(words[i])
            i += 1
    return " ".join(flags), beds


def trainer_argv(beds: list[str], recipe: str, output: Path, work: Path) -> list[str]:
    return [
        *recipe.split(),
        *(argument for name in beds for argument in ("--bed", name)),
        "--threads",
        "1",
        "--no-progress",
        "--output",
        typed(output),
        "--checkpoint",
        typed(work / f"{output.stem}.ckpt"),
        "--report-dir",
        typed(work / output.stem),
    ]


def train(beds: list[str], recipe: str, output: Path, work: Path, log=print) -> None:
    """The trainer's command line on ``beds`` with ``recipe``, writing ``output`` (its report and checkpoint under
    ``work``); a file at ``output`` that records this very command is kept instead."""
    argv = trainer_argv(beds, recipe, output, work)
    if output.is_file() and training_record(output).get("command") == shlex.join([*_TRAINER, *argv]):
        log(f"kept {typed(output)}: it records this command")
        return
    log(f"training {typed(output)} on {', '.join(beds)}")
    cli.main(argv)


def git_file(revision: str, family: str, into: Path) -> Path:
    """``solver/bundled/default-<family>.safetensors`` as it was at ``revision``, copied to ``into``."""
    shown = subprocess.run(
        ["git", "-C", str(REPOSITORY), "show", f"{revision}:solver/bundled/default-{family}.safetensors"],
        capture_output=True,
        check=False,
    )
    if shown.returncode != 0:
        raise SystemExit(
            f"error: give a coefficient file or a git revision of this repository (a full clone) whose "
            f"solver/bundled/ holds default-{family}.safetensors, not {revision!r}: {shown.stderr.decode().strip()}"
        )
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_bytes(shown.stdout)
    return into


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclasses.dataclass
class Candidate:
    """A file that could ship: its name in the tables, where it came from, the file, the recipe and beds it was
    trained with (its recorded command), and for each learned bed the file that did not see that bed."""

    name: str
    source: str
    file: Path
    recipe: str
    beds: list[str]
    unseen: dict[str, Path] = dataclasses.field(default_factory=dict)


def fixed_candidate(name: str, spec: str, family: str, work: Path) -> Candidate:
    """A candidate given as a path or a git revision, copied into ``work/candidates``."""
    path, target = Path(spec), work / "candidates" / f"{name}.safetensors"
    if path.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        source = typed(path)
    else:
        git_file(spec, family, target)
        source = f"solver/bundled/default-{family}.safetensors at {spec}"
    recipe, beds = recorded_recipe(target)
    return Candidate(name, source, target, recipe, beds)


def make_unseen(candidate: Candidate, learned: list[str], work: Path, log) -> None:
    """For each learned bed the file that did not see it: the candidate's own, or its recorded command without the
    bed (a fold)."""
    for name in learned:
        if name not in candidate.beds:
            candidate.unseen[name] = candidate.file
            continue
        fold = work / "folds" / f"{candidate.name}-without-{name}.safetensors"
        started = time.perf_counter()
        train([bed for bed in candidate.beds if bed != name], candidate.recipe, fold, work / "folds", log)
        log(f"  {fold.name}: {time.perf_counter() - started:.0f} s")
        candidate.unseen[name] = fold


class CellCache:
    """RMSE per (bed, noises, row, steps), keyed by the content of the file a row runs (a row's label names the
    file's stem, which the key replaces by the file's digest), kept in a JSON file between runs."""

    def __init__(self, path: Path):
        self.path = path
        self.cells = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> list[float] | None:
        return self.cells.get(key)

    def put(self, key: str, value: list[float] | None) -> None:
        self.cells[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.cells, indent=0, sort_keys=True))
        partial.replace(self.path)


def judge(name: str, files: list[Path], count: int | None, cache: CellCache, log) -> benchmark.BedResult:
    """The benchmark's judgement of ``files`` on bed ``name`` at ``STEP_COUNTS``: each file on the bed's stock
    schedule and its learned one, both against every stock sampler on the stock schedule (``BedResult.judged``);
    RMSE and median per cell."""
    bed = get_testbed(name)
    count = count or benchmark.bed_samples(name, quick=False)
    noise, labels = seeded_batch(bed, held_out_seeds(count))
    references = None
    result = benchmark.BedResult(bed.name, ("", ""), kind=bed.kind)
    rows = [(row, row.label) for row in benchmark.stock_rows(bed, noise, labels)]
    stock = [row.label for row, _ in rows]
    roles = {benchmark.STOCK_SCHEDULE[bed.kind]: "bed's", benchmark.LEARNED_SCHEDULE: "learned"}
    for path in dict.fromkeys(files):
        content = digest(path)
        for row in benchmark.consistency_rows(bed, noise, labels, [path]):
            rows.append((row, row.label.replace(path.stem, content)))
        # On either schedule a file is judged against the stock samplers as users run them, on the family's schedule.
        result.judged[path.stem] = {
            schedule: (benchmark.solver_label(path, role), stock) for schedule, role in roles.items()
        }
    for row, key in rows:
        result.rows[row.label] = {}
        for steps in STEP_COUNTS:
            cell_key = f"{bed.identity()}|{count}|{key}|{steps}"
            if cell_key not in cache.cells:
                if references is None:
                    log(f"  {name}: references ({count} held-out noises)")
                    references = reference_finals(
                        bed, noise, labels, steps=benchmark.REFERENCE_STEPS, cache_dir=reference_cache_dir()
                    )
                log(f"  {name}: {row.label}, {steps} steps")
                finals = row.run(steps)
                value = None
                if finals is not None:
                    value = [consistency_rmse(finals, references), float(rmse_per_sample(finals, references).median())]
                cache.put(cell_key, value)
            value = cache.get(cell_key)
            result.rows[row.label][steps] = None if value is None else tuple(value)
    return result


Cells = dict[str, dict[int, benchmark.Judgement]]  # {schedule: {steps: judgement}}


def schedule_role(kind: str, schedule: str) -> str:
    """``stock`` (karras or simple) or ``learned`` (the file's own, the ``consistency_solver`` scheduler)."""
    return "stock" if schedule == benchmark.STOCK_SCHEDULE[kind] else "learned"


@dataclasses.dataclass
class Verdict:
    """A candidate under the rule: the cells worse than the previous file's by more than ``NO_WORSE`` (a), the
    monotonicity breaks (b), the mean ratio to the best stock sampler (c)."""

    name: str
    worse: list[dict]
    breaks: list[dict]
    mean_to_best: float

    @property
    def passes(self) -> tuple[bool, bool]:
        return not self.worse, not self.breaks

    def order(self) -> tuple[bool, bool, float]:
        """The rule's order: a file that passes (a) first, then (b), then the lowest mean ratio."""
        a, b = self.passes
        return (not a, not b, self.mean_to_best)


def worse_cells(cells: dict[str, Cells], baseline: dict[str, Cells], limit: float = NO_WORSE) -> list[dict]:
    """Every cell of ``cells`` ({bed: {schedule role: {steps: judgement}}}) worse than ``baseline``'s by more than
    ``limit``."""
    found = []
    for bed, schedules in cells.items():
        for role, steps in schedules.items():
            for n, cell in steps.items():
                other = baseline.get(bed, {}).get(role, {}).get(n)
                if other is not None and cell.rmse > limit * other.rmse:
                    found.append(
                        {"bed": bed, "schedule": role, "steps": n, "rmse": cell.rmse, "baseline": other.rmse,
                         "ratio": cell.rmse / other.rmse}
                    )  # fmt: skip
    return found


def monotone_breaks(cells: dict[str, Cells], view: str) -> list[dict]:
    """Every step where a larger count's RMSE exceeds the smaller one's (``MONOTONE_STEPS``), per bed and schedule."""
    found = []
    for bed, schedules in cells.items():
        for role, steps in schedules.items():
            counts = [n for n in MONOTONE_STEPS if n in steps]
            for small, large in zip(counts, counts[1:], strict=False):
                if steps[large].rmse > steps[small].rmse:
                    found.append(
                        {"bed": bed, "view": view, "schedule": role, "from": small, "to": large,
                         "rmse_from": steps[small].rmse, "rmse_to": steps[large].rmse}
                    )  # fmt: skip
    return found


def mean_to_best(cells: dict[str, Cells]) -> float:
    return statistics.fmean(cell.to_best for roles in cells.values() for s in roles.values() for cell in s.values())


def verdict(name: str, left_out: dict[str, Cells], own: dict[str, Cells], previous: dict[str, Cells]) -> Verdict:
    """The rule applied to one candidate: ``left_out`` its cells on each learned bed left out, ``own`` its own
    file's on every bed, ``previous`` the previously shipped file's on each learned bed left out."""
    breaks = monotone_breaks(left_out, "left out") + monotone_breaks(own, "own file")
    return Verdict(name, worse_cells(left_out, previous), breaks, mean_to_best(left_out))


def acceptance(left_out: dict[str, Cells]) -> list[dict]:
    """Issue 21's acceptance cells on each learned bed left out: ratio to the best stock sampler against its limit."""
    return [
        {"bed": bed, "schedule": role, "steps": n, "to_best": schedules[role][n].to_best, "limit": limit,
         "met": schedules[role][n].to_best <= limit}
        for bed, schedules in left_out.items()
        for role, limits in ACCEPTANCE.items()
        for n, limit in limits.items()
        if n in schedules.get(role, {})
    ]  # fmt: skip


def role_cells(result: benchmark.BedResult, stem: str) -> Cells:
    """The judged file's cells keyed by schedule role (``stock`` / ``learned``)."""
    return {schedule_role(result.kind, s): c for s, c in benchmark.judgements(result, stem).items()}


def cell_text(cell: benchmark.Judgement | None) -> str:
    return "—" if cell is None else f"{cell.rmse:.3f} ({cell.to_best:.2f}x)"


def comparison_table(title: str, candidates: list[str], cells: dict[str, dict[str, Cells]], kind: str) -> str:
    """Per bed, step count and schedule: each candidate's RMSE (x the best stock sampler on the stock schedule), the
    best stock sampler on the stock schedule, and each candidate's ratio to the first's RMSE."""
    stock = benchmark.STOCK_SCHEDULE[kind]
    others = candidates[1:]
    head = [
        "bed", "steps", "schedule", *candidates, f"best stock on {stock}",
        *(f"{name} / {candidates[0]}" for name in others),
    ]  # fmt: skip
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    beds = list(dict.fromkeys(bed for name in candidates for bed in cells[name]))
    for bed in beds:
        for role in ("learned", "stock"):
            for n in STEP_COUNTS:
                row = [cells[name].get(bed, {}).get(role, {}).get(n) for name in candidates]
                if all(cell is None for cell in row):
                    continue
                shown = next(cell for cell in row if cell is not None)
                best = f"{shown.best_stock_rmse:.3f} {shown.best_stock}" if role == "stock" else ""
                ratios = [
                    "—" if cell is None or row[0] is None else f"{cell.rmse / row[0].rmse:.2f}" for cell in row[1:]
                ]
                schedule = stock if role == "stock" else "learned"
                lines.append(
                    f"| {bed} | {n} | {schedule} | " + " | ".join(map(cell_text, row)) + f" | {best} | "
                    + " | ".join(ratios) + " |"
                )  # fmt: skip
    return "\n".join(lines) + "\n"


def verdict_table(verdicts: list[Verdict], sources: dict[str, str], chosen: str) -> str:
    lines = [
        "| candidate | source | (a) cells > 3 % worse than previous | (b) monotonicity breaks | (c) mean x best | |",
        "|---|---|---|---|---|---|",
    ]
    for found in verdicts:
        worst = max(found.worse, key=lambda cell: cell["ratio"], default=None)
        worse = "none" if worst is None else (
            f"{len(found.worse)}, worst {worst['ratio']:.2f}x ({worst['bed']}, {worst['steps']} steps, "
            f"{worst['schedule']})"
        )  # fmt: skip
        biggest = max(found.breaks, key=lambda b: b["rmse_to"] / b["rmse_from"], default=None)
        breaks = "none" if biggest is None else (
            f"{len(found.breaks)}, worst {biggest['rmse_to'] / biggest['rmse_from']:.2f}x ({biggest['bed']}, "
            f"{biggest['view']}, {biggest['schedule']}, {biggest['from']} -> {biggest['to']} steps)"
        )  # fmt: skip
        mark = "**chosen**" if found.name == chosen else ""
        lines.append(
            f"| {found.name} | {sources[found.name]} | {worse} | {breaks} | {found.mean_to_best:.3f} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def acceptance_table(rows: list[dict], kind: str) -> str:
    stock = benchmark.STOCK_SCHEDULE[kind]
    lines = ["| bed left out | schedule | steps | x best stock | limit | met |", "|---|---|---|---|---|---|"]
    for row in rows:
        schedule = stock if row["schedule"] == "stock" else "learned"
        met = "yes" if row["met"] else "**no**"
        lines.append(
            f"| {row['bed']} | {schedule} | {row['steps']} | {row['to_best']:.2f}x | {row['limit']:.2f}x | {met} |"
        )
    return "\n".join(lines) + "\n"


def write_choice(chosen: Candidate, output: Path, record: dict) -> None:
    """The chosen file at ``output``, its ``training`` metadata extended by the rule's verdict."""
    tensors = load_file(str(chosen.file))
    with safe_open(str(chosen.file), "pt") as opened:
        metadata = dict(opened.metadata())
    training = json.loads(metadata.get("training") or "{}")
    training["choice"] = record
    metadata["training"] = json.dumps(training, sort_keys=True)
    write_safetensors(output, tensors, metadata)


def named_recipe(text: str) -> tuple[str, str]:
    """``NAME=FLAGS`` or ``FLAGS`` (named ``recipe``)."""
    name, equals, flags = text.partition("=")
    if not equals or name.startswith("-"):
        return RECIPE, text
    return name.strip(), flags.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument(
        "--recipe",
        action="append",
        help="a recipe to train as a candidate: the trainer's flags besides --bed and --output, or NAME=FLAGS to name "
        f"it (repeatable; default: the family's, named {RECIPE!r})",
    )
    parser.add_argument(
        "--previous",
        help="the previously shipped file: a git revision (its solver/bundled/default-<family>.safetensors) or a path "
        "(default: the file at --output when the run starts)",
    )
    parser.add_argument(
        "--candidate", action="append", default=[], help="another candidate: a git revision or a path (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/leave_one_out"), help="folder for files and tables")
    parser.add_argument(
        "--output", type=Path, help="where the chosen default goes (default: solver/bundled/default-<family>)"
    )
    parser.add_argument("--samples", type=int, help="held-out noises per bed (default: the benchmark's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    missing = stock_samplers.comfy_unavailable_reason()
    if missing:
        raise SystemExit(f"error: set COMFYUI_PATH to a ComfyUI tree: the candidates are judged against ComfyUI's own "
                         f"samplers ({missing})")  # fmt: skip
    torch.set_num_threads(1)
    family = args.family
    recipes = dict(named_recipe(text) for text in args.recipe) if args.recipe else {RECIPE: RECIPES[family]}
    output = args.output or BUNDLED_DIR / f"default-{family}.safetensors"
    work = args.out / family
    work.mkdir(parents=True, exist_ok=True)
    arguments = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "consistency_solver.training.trainer.leave_one_out", *arguments])

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    learned, mixtures = family_beds(family)
    every = [*learned, *mixtures]
    if args.previous is None and not output.is_file():
        raise SystemExit(f"error: give --previous (a git revision or a file): there is no {output} to compare with")
    candidates = [fixed_candidate(PREVIOUS, args.previous or str(output), family, work)]
    candidates += [
        fixed_candidate(Path(spec).stem if Path(spec).is_file() else spec, spec, family, work)
        for spec in args.candidate
    ]
    seconds = {}
    for name, flags in recipes.items():
        # Each recipe's file is trained at --output (the command it records remakes it there), then kept aside.
        started, recipe_file = time.perf_counter(), work / "candidates" / f"{name}.safetensors"
        command_line = shlex.join([*_TRAINER, *trainer_argv(every, flags, output, work)])
        if recipe_file.is_file() and training_record(recipe_file).get("command") == command_line:
            log(f"kept {typed(recipe_file)}: it records this command")
        else:
            train(every, flags, output, work, log)
            shutil.copyfile(output, recipe_file)
            seconds[name] = time.perf_counter() - started
        candidates.append(Candidate(name, f"`{flags}` on every bed", recipe_file, flags, every))
    for candidate in candidates:
        make_unseen(candidate, learned, work, log)

    cache = CellCache(work / "cells.json")
    results = {}
    for name in every:
        files = [c.unseen[name] for c in candidates if name in c.unseen] + [c.file for c in candidates]
        log(f"judging {len(set(files))} files on {name}")
        results[name] = judge(name, files, args.samples, cache, log)
    left_out = {c.name: {b: role_cells(results[b], c.unseen[b].stem) for b in learned} for c in candidates}
    own = {c.name: {b: role_cells(results[b], c.file.stem) for b in every} for c in candidates}

    # A file that did not see a learned bed is its own file left out there: its breaks count once.
    checked = {c.name: {b: own[c.name][b] for b in every if c.unseen.get(b) != c.file} for c in candidates}
    verdicts = [verdict(c.name, left_out[c.name], checked[c.name], left_out[PREVIOUS]) for c in candidates]
    winner = min(verdicts, key=Verdict.order)
    chosen = next(c for c in candidates if c.name == winner.name)
    sources = {c.name: c.source for c in candidates}
    names = [c.name for c in candidates]
    accepted = {c.name: acceptance(left_out[c.name]) for c in candidates}
    record = {
        "rule": RULE,
        "command": command,
        "chosen": chosen.name,
        "candidates": {
            found.name: {
                "source": sources[found.name],
                "beds": next(c.beds for c in candidates if c.name == found.name),
                "recipe": next(c.recipe for c in candidates if c.name == found.name),
                "trained_by_protocol": found.name in recipes,
                "passes_a": found.passes[0],
                "passes_b": found.passes[1],
                "cells_worse_than_previous": len(found.worse),
                "worst_to_previous": max((cell["ratio"] for cell in found.worse), default=None),
                "monotone_breaks": [
                    f"{b['bed']} ({b['view']}, {b['schedule']}): {b['from']} -> {b['to']} steps, "
                    f"{b['rmse_from']:.4f} -> {b['rmse_to']:.4f}"
                    for b in found.breaks
                ],
                "mean_to_best": round(found.mean_to_best, 4),
                "acceptance_missed": [
                    f"{row['bed']} {row['schedule']} {row['steps']} steps {row['to_best']:.2f}x > {row['limit']}x"
                    for row in accepted[found.name]
                    if not row["met"]
                ],
            }
            for found in verdicts
        },
    }
    write_choice(chosen, output, record)
    log(f"chose {chosen.name}; wrote {typed(output)}")

    sections = [
        f"## Choosing default-{family}\n",
        f"`{command}`\n",
        "Recipes: " + "; ".join(f"{name}: `{flags}`" for name, flags in recipes.items()) + "\n",
        "Rule: " + RULE + ".\n",
        comparison_table(
            "### Each learned bed left out: RMSE to the 40-step final (x the best stock sampler on the stock schedule)",
            names,
            left_out,
            family,
        ),
        comparison_table(
            "### Each candidate's own file on every bed (mixtures: information and monotonicity)", names, own, family
        ),
        "### The rule's verdict\n\n" + verdict_table(verdicts, sources, chosen.name),
        f"### Issue 21's acceptance for {chosen.name}, each learned bed left out\n\n"
        + acceptance_table(accepted[chosen.name], family),
    ]
    for other in candidates:
        if other.name != chosen.name:
            worse = worse_cells(left_out[chosen.name], left_out[other.name])
            cells = ", ".join(
                f"{cell['bed']} {cell['schedule']} {cell['steps']} steps {cell['ratio']:.2f}x" for cell in worse
            )
            sections.append(
                f"Cells left out where {chosen.name} is worse than {other.name} by more than "
                f"{100 * (NO_WORSE - 1):.0f} %: {cells or 'none'}.\n"
            )
    if seconds:
        sections.append("Training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n")
    text = "\n".join(sections)
    print(text, flush=True)
    (args.out / f"defaults_{family}.md").write_text(text)

    def dump(cells: dict[str, Cells]) -> dict:
        return {
            bed: {role: {str(n): dataclasses.asdict(cell) for n, cell in steps.items()} for role, steps in s.items()}
            for bed, s in cells.items()
        }

    payload = {
        **record,
        "recipes": recipes,
        "seconds": seconds,
        "verdicts": [dataclasses.asdict(found) for found in verdicts],
        "left_out": {name: dump(cells) for name, cells in left_out.items()},
        "own": {name: dump(cells) for name, cells in own.items()},
        "acceptance": accepted,
    }
    (args.out / f"defaults_{family}.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
