"""Leave-one-bed-out training of a default coefficient file, then the default itself on every bed of its family.

    python -m consistency_solver.training.trainer.leave_one_out --family eps [--out DIR] [--output PATH]

A default meets checkpoints it never saw, so its recipe is judged on beds it did not see. For each learned bed of the
family (every non-mixture bed whose model kind is the family's), the recipe trains a file on all the other beds of
the family and the benchmark judges it on the bed left out: 5 and 8 steps, on the stock schedule users pick and on
its learned schedule, against every stock ComfyUI sampler on the same schedule, on held-out noises. Then the recipe
trains on every bed of the family (the shipped default, ``--output``) and that file is judged on all of them. The
tables go to stdout and ``OUT/leave_one_out.md``, the numbers to ``OUT/leave_one_out.json``.

The families: ``eps`` (EPS and V-prediction models; a V model samples in ComfyUI's EPS space) and ``flow``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ...solver.defaults import BUNDLED_DIR
from ..evaluation import benchmark
from ..testbeds import GMM_BEDS, TESTBED_NAMES, get_testbed
from . import cli

FAMILIES = ("eps", "flow")
JUDGED_STEPS = (5, 8)
# The acceptance: on a bed left out, at most this times the best stock sampler on one of the schedules and
# this times the sampler users pick; on the mixtures (seen in training), at most this times the best stock sampler.
LEFT_OUT_TO_BEST = {5: 1.0, 8: 1.0}
LEFT_OUT_TO_USERS = 0.8
MIXTURE_TO_BEST = {5: 1.0, 8: 1.25}
# The recipe of the shipped defaults (README, "Shipped files"): the trainer's flags besides --bed and --output. The
# learned beds' batches hold 4 noises (their calls are costly), the mixtures' 64 of 4096 (to see the rare noises near
# a mode boundary); the mixtures get half the batches for EPS and three quarters for flow, where that share brought
# the flow mixtures' 5-step error closer to the best stock sampler's; the flow default's step to sigma 0 returns the
# denoised estimate (its learned last step extrapolated past it and kept the flow mixtures 1.2x-1.8x behind the best
# stock sampler at 5 steps; README, "Defaults that travel").
COMMON = (
    "--mode direct --schedule learned --steps 4-12 --form policy --lr-schedule cosine --updates 250 --batch 4 "
    "--mixture-batch 64 --train-count 128 --mixture-train-count 4096 --held-out-count 64 --report-steps 5,8"
)
RECIPES = {
    "eps": f"{COMMON} --mixture-share 0.5 --lr 5e-3",
    "flow": f"{COMMON} --mixture-share 0.75 --lr 1e-2 --last-step denoised",
}


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


def train(beds: list[str], recipe: str, output: Path, work: Path) -> None:
    """The trainer's command line on ``beds`` with ``recipe``, writing ``output`` (its report and checkpoint under
    ``work``)."""
    argv = [
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
    cli.main(argv)


def judge(path: Path, beds: list[str], samples: int | None, log) -> dict[str, benchmark.BedResult]:
    """The benchmark's judgement of the file at ``path`` on each of ``beds`` (held-out noises, 5 and 8 steps)."""
    results = {}
    for name in beds:
        bed = get_testbed(name)
        count = samples or benchmark.bed_samples(name, quick=False)
        log(f"judging {path.name} on {name} ({count} held-out noises)")
        results[name] = benchmark.evaluate_bed(
            bed, count, JUDGED_STEPS, [path], match=False, log=log, judged=[path], judged_only=True
        )
    return results


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A bed's acceptance: the schedules on which a file meets it (empty: missed)."""

    bed: str
    left_out: bool
    schedules: tuple[str, ...]


def verdict(name: str, result: benchmark.BedResult, stem: str, left_out: bool) -> Verdict:
    """Where the file ``stem`` meets the acceptance on ``name``: a bed left out needs every judged step count within
    ``LEFT_OUT_TO_BEST`` of the best stock sampler and ``LEFT_OUT_TO_USERS`` of the users' sampler on one schedule;
    a mixture needs ``MIXTURE_TO_BEST``."""
    passing = []
    for schedule, cells in benchmark.judgements(result, stem).items():
        if not all(n in cells for n in JUDGED_STEPS):
            continue
        if left_out:
            met = all(
                cells[n].to_best <= LEFT_OUT_TO_BEST[n]
                and cells[n].to_users is not None
                and cells[n].to_users <= LEFT_OUT_TO_USERS
                for n in JUDGED_STEPS
            )
        else:
            met = all(cells[n].to_best <= MIXTURE_TO_BEST[n] for n in JUDGED_STEPS)
        if met:
            passing.append(schedule)
    return Verdict(name, left_out, tuple(passing))


def verdict_lines(verdicts: list[Verdict]) -> list[str]:
    lines = []
    for found in verdicts:
        rule = (
            f"<= {LEFT_OUT_TO_BEST[5]}x / {LEFT_OUT_TO_BEST[8]}x the best stock sampler and <= {LEFT_OUT_TO_USERS}x "
            "the users' sampler at 5 / 8 steps"
            if found.left_out
            else f"<= {MIXTURE_TO_BEST[5]}x / {MIXTURE_TO_BEST[8]}x the best stock sampler at 5 / 8 steps"
        )
        where = f"met on {', '.join(found.schedules)}" if found.schedules else "missed on both schedules"
        seen = "left out" if found.left_out else "trained on"
        lines.append(f"- {found.bed} ({seen}; {rule}): {where}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--recipe", help="the trainer's flags besides --bed and --output (default: the family's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/leave_one_out"), help="folder for files and tables")
    parser.add_argument(
        "--output", type=Path, help="the default trained on every bed (default: solver/bundled/default-<family>)"
    )
    parser.add_argument("--samples", type=int, help="held-out noises per bed (default: the benchmark's)")
    parser.add_argument(
        "--left-out", nargs="*", help="the learned beds to leave out, one fold each (default: every one of the family)"
    )
    parser.add_argument("--skip-final", action="store_true", help="only the left-out folds, no default")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    recipe = args.recipe or RECIPES[args.family]
    output = args.output or BUNDLED_DIR / f"default-{args.family}.safetensors"
    work = args.out / args.family
    work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    learned, mixtures = family_beds(args.family)
    every = [*learned, *mixtures]
    left_out_beds = learned if args.left_out is None else args.left_out
    unknown = sorted(set(left_out_beds) - set(learned))
    if unknown:
        raise SystemExit(
            f"error: give --left-out learned beds of the {args.family} family ({', '.join(learned)}), "
            f"not {', '.join(unknown)}"
        )
    sections = [f"## Leave-one-bed-out: {args.family}\n", f"Recipe: `{recipe}`\n"]
    results, verdicts, seconds = {}, [], {}
    for left_out in left_out_beds:
        path = work / f"without-{left_out}.safetensors"
        started = time.perf_counter()
        log(f"training without {left_out}")
        train([name for name in every if name != left_out], recipe, path, work)
        seconds[path.stem] = time.perf_counter() - started
        result = judge(path, [left_out], args.samples, log)[left_out]
        results[f"{left_out} (left out)"] = result
        verdicts.append(verdict(left_out, result, path.stem, left_out=True))
        log(benchmark.judgement_table({f"{left_out} (left out)": result}))  # each fold as soon as it is judged
    sections.append(benchmark.judgement_table(results))
    if not args.skip_final:
        started = time.perf_counter()
        log(f"training the default on {', '.join(every)}")
        train(every, recipe, output, work)
        seconds[output.stem] = time.perf_counter() - started
        final = judge(output, every, args.samples, log)
        sections.append(benchmark.judgement_table(final))
        verdicts += [verdict(name, final[name], output.stem, left_out=False) for name in mixtures]
        results |= {name: result for name, result in final.items()}
    sections.append("Acceptance:\n\n" + "\n".join(verdict_lines(verdicts)) + "\n")
    sections.append("Training seconds: " + ", ".join(f"{stem} {s:.0f}" for stem, s in seconds.items()) + "\n")
    text = "\n".join(sections)
    print(text, flush=True)
    (args.out / f"leave_one_out_{args.family}.md").write_text(text)
    payload = {
        "recipe": recipe,
        "seconds": seconds,
        "verdicts": [dataclasses.asdict(found) for found in verdicts],
        "judgements": {
            label: {
                stem: {
                    schedule: {str(n): dataclasses.asdict(cell) for n, cell in cells.items()}
                    for schedule, cells in benchmark.judgements(result, stem).items()
                }
                for stem in result.judged
            }
            for label, result in results.items()
        },
    }
    (args.out / f"leave_one_out_{args.family}.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
