"""``python -m consistency_solver.training``: train ConsistencySolver coefficients and write a coefficient file.

Examples::

    # the paper's method (PPO) on a built-in test bed
    python -m consistency_solver.training --bed gmm-image-eps-cfg --mode ppo --output gmm.safetensors
    # the fast mode (gradient through the unrolled solver) on a mix of beds
    python -m consistency_solver.training --bed gmm-image-eps-cfg --bed fashion-eps-cfg --mode direct
    # a real ComfyUI checkpoint (run with ComfyUI's python; GPU when present)
    python -m consistency_solver.training --comfy-checkpoint sd15.safetensors --prompts prompts.txt --cfg 3
    # forward-only calibration (no backward pass through the model) within a budget of model calls
    python -m consistency_solver.training --bed fashion-eps-cfg --mode calibrate --steps 5,8 --budget 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...solver import format_steps, parse_step_counts, save_coefficients
from ...solver.coefficients import ROW_SUMS
from ...solver.files import model_kind
from ...solver.policy import LAST_STEPS
from ..evaluation.calibrated import CALIBRATED, Refine, calibrate_bed, judge, ratio_to_best_stock
from ..evaluation.references import (
    REFERENCE_METHODS,
    TRAINING_SEED_LIMIT,
    held_out_seeds,
    reference_cache_dir,
    reference_sampler,
    seeded_batch,
)
from ..testbeds import GMM_BEDS, TESTBED_NAMES, get_testbed
from . import distributed
from .comfy_model import (
    CheckpointNotFound,
    CheckpointRequest,
    NoPrompts,
    checkpoint_path,
    comfy_model,
    comfy_problem,
)
from .data import ReferenceSettings, bed_problem
from .loop import (
    FORMS,
    LR_SCHEDULES,
    MODES,
    SCHEDULES,
    CheckpointError,
    CheckpointMismatch,
    CheckpointWriteError,
    Problem,
    SettingError,
    TrainConfig,
    TrainState,
    coefficients,
    evaluate_policy,
    read_checkpoint,
    train,
)
from .ppo import PPOSettings
from .report import write_report
from .rewards import REWARD_NAMES, load_feature_encoder, make_reward

CALIBRATE = "calibrate"  # forward-only calibration (the runtime's calibration room), not a TrainConfig mode


def checked(convert: Callable[[str], Any], rule: str, valid: Callable[[Any], bool] = lambda value: True):
    """An argparse ``type`` that converts the text with ``convert`` and refuses what it cannot convert or ``valid``
    rejects, saying "use <rule>, not <text>" (argparse names the flag before it)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
            if valid(value):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"use {rule}, not {text}")

    return parse


STEP_COUNTS = checked(parse_step_counts, "step counts of at least 1, as 4-12 or 5,8")
AT_LEAST_ONE = checked(int, "a whole number of at least 1", lambda n: n >= 1)
TRAINING_NOISES = checked(
    int, f"a whole number from 1 to {TRAINING_SEED_LIMIT}", lambda n: 1 <= n <= TRAINING_SEED_LIMIT
)
GUIDANCE = checked(float, "a finite number of at least 0", lambda x: math.isfinite(x) and x >= 0)
LATENT_SIDE = checked(int, "a positive multiple of 8", lambda n: n > 0 and n % 8 == 0)
PROMPTS_FILE = checked(Path, "an existing text file, one prompt per line", Path.is_file)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="consistency-solver-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = p.add_argument_group("what to train for (give --bed, or --comfy-checkpoint)")
    model = source.add_mutually_exclusive_group(required=True)
    model.add_argument("--bed", action="append", choices=TESTBED_NAMES, help="built-in test bed; repeat to mix beds")
    model.add_argument("--comfy-checkpoint", help="a ComfyUI checkpoint file (path or name in models/checkpoints)")
    source.add_argument("--comfyui", help="the ComfyUI install (default: $COMFYUI_PATH or /opt/ComfyUI)")
    source.add_argument("--prompts", type=PROMPTS_FILE, help="text file, one prompt per line (ComfyUI backend)")
    source.add_argument("--negative", default="", help="negative prompt (ComfyUI backend)")
    source.add_argument("--cfg", type=GUIDANCE, default=3.0, help="CFG scale (ComfyUI backend; the paper: 3)")
    source.add_argument("--scheduler", default="simple", help="ComfyUI scheduler for the sigmas (ComfyUI backend)")
    source.add_argument("--width", type=LATENT_SIDE, default=512)
    source.add_argument("--height", type=LATENT_SIDE, default=512)

    method = p.add_argument_group("optimisation")
    method.add_argument(
        "--mode",
        choices=(*MODES, CALIBRATE),
        default="ppo",
        help="ppo (the paper), direct (fast, back-propagates through the model) or calibrate (forward-only, within "
        "--budget model calls: one bed or checkpoint)",
    )
    method.add_argument(
        "--budget",
        type=int,
        default=3000,
        help="calibrate: most model calls, the reference runs included; it sets how many noises are fitted on and "
        "held out",
    )
    method.add_argument("--steps", type=STEP_COUNTS, default=tuple(range(4, 13)), help="step counts (default 4-12)")
    method.add_argument("--updates", type=int, default=200)
    method.add_argument("--lr", type=float, default=1e-3)
    method.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default="constant", help="cosine: decay the lr to 0 over --updates"
    )
    method.add_argument("--weight-decay", type=float, default=1e-3)
    method.add_argument("--grad-clip", type=float, default=1.0)
    method.add_argument("--groups", type=int, default=4, help="ppo: groups per update")
    method.add_argument("--rollouts", type=int, default=16, help="ppo: rollouts per group (the paper: 80)")
    method.add_argument("--epochs", type=int, default=4, help="ppo: passes over each batch of rollouts")
    method.add_argument("--clip", type=float, default=0.2, help="ppo: ratio clip")
    method.add_argument("--entropy-coef", type=float, default=0.01)
    method.add_argument("--std-floor", type=float, default=1e-3, help="ppo: floor on the group reward std")
    method.add_argument("--batch", type=int, default=16, help="direct: samples per step count per update")
    method.add_argument(
        "--mixture-batch",
        type=int,
        default=0,
        help="direct: the batch of a Gaussian-mixture bed in a mix (0: --batch); mixtures are cheap and need large "
        "batches to see the rare noises near a mode boundary",
    )
    method.add_argument(
        "--mixture-share",
        type=float,
        default=0.0,
        help="direct: the share of batches drawn from the Gaussian-mixture beds of a mix with other beds (0: every "
        "bed alike)",
    )
    method.add_argument("--bins", type=int, default=21, help="grid points per coefficient (21 puts AB2 on the grid)")
    method.add_argument("--order", type=int, default=4)
    method.add_argument("--hidden", type=int, default=256)
    method.add_argument("--gradient-checkpointing", action="store_true", help="direct: recompute model calls")
    method.add_argument(
        "--form",
        choices=FORMS,
        default="policy",
        help="policy: the paper's network of the step times; table (direct mode): free weights per step count",
    )
    method.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="given",
        help="given: train on the bed's (or --scheduler's) sigmas; learned (direct mode): learn the sigmas of each "
        "step count too and store them in the file, for the consistency_solver scheduler",
    )
    method.add_argument(
        "--row-sums",
        choices=ROW_SUMS,
        default="one",
        help="one: every step's weights sum to 1 (the paper); free (table form): each step also learns a positive "
        "step scale, which halves the 5-step error on the mixtures (not first-order consistent)",
    )
    method.add_argument(
        "--last-step",
        choices=LAST_STEPS,
        default="learned",
        help="learned: the policy weighs the step to sigma 0 like any other (the paper); denoised (policy form): that "
        "step returns the model's denoised estimate, as every stock sampler's last step does",
    )

    data = p.add_argument_group("references and reward")
    data.add_argument("--reward", choices=REWARD_NAMES, default="rmse")
    data.add_argument("--feature-factory", help="feature reward: 'package.module:function' building the encoder")
    data.add_argument("--feature-weights", help="feature reward: local weights file or folder")
    data.add_argument("--reference-method", choices=REFERENCE_METHODS, default="multistep")
    data.add_argument("--reference-steps", type=AT_LEAST_ONE, default=40)
    data.add_argument("--train-count", type=TRAINING_NOISES, default=256, help="training noises (seeds below 10000)")
    data.add_argument(
        "--mixture-train-count",
        type=TRAINING_NOISES,
        help="training noises of a Gaussian-mixture bed (default: --train-count)",
    )
    data.add_argument("--held-out-count", type=AT_LEAST_ONE, default=128, help="held-out noises (seeds 10000 and up)")
    data.add_argument(
        "--references-dir",
        help="reference cache (default: $CONSISTENCY_SOLVER_REFERENCE_CACHE, else "
        "~/.cache/consistency-solver/references)",
    )

    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output", required=True, help="the coefficient file to write (.safetensors)")
    run.add_argument("--model-family", help="override the recorded model family (<name>-eps or <name>-flow)")
    run.add_argument("--description", default="")
    run.add_argument("--checkpoint", help="training checkpoint file (default: <output>.ckpt)")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=TrainConfig.checkpoint_every,
        help="write the checkpoint every N updates (and at the end): a crash or Ctrl-C loses at most N updates",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --checkpoint (refused when there is none); a finished run writes its file again",
    )
    run.add_argument(
        "--report-dir", help="where report.json and report.png go (default: --output without .safetensors)"
    )
    run.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N updates (0: off)")
    run.add_argument(
        "--report-steps",
        type=STEP_COUNTS,
        help="step counts of the held-out evaluation (default 5,8, those of them in --steps) and of the report "
        "(default: --steps)",
    )
    run.add_argument("--threads", type=AT_LEAST_ONE, default=None, help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        mode=args.mode,
        steps=tuple(args.steps),
        updates=args.updates,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        groups=args.groups,
        batch=args.batch,
        mixture_batch=args.mixture_batch,
        mixture_share=args.mixture_share,
        order=args.order,
        bins=args.bins,
        hidden=args.hidden,
        seed=args.seed,
        ppo=PPOSettings(args.rollouts, args.epochs, args.clip, args.entropy_coef, args.std_floor),
        eval_steps=tuple(args.report_steps or (5, 8)),
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
        schedule=args.schedule,
        form=args.form,
        lr_schedule=args.lr_schedule,
        row_sums=args.row_sums,
        last_step=args.last_step,
    )


# Settings whose flag is not --<name with dashes>.
SETTING_FLAGS = {"eval_steps": "--report-steps"}


def flag(name: str) -> str:
    return SETTING_FLAGS.get(name, "--" + name.replace("_", "-"))


def typed(value: Any) -> str:
    """A setting as it is typed on the command line (step counts as 4-12 or 4,5,8)."""
    return format_steps(value).replace(" ", "") if isinstance(value, tuple) else str(value)


def checked_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the flags; what it refuses, argparse reports."""
    try:
        return config_from(args)
    except SettingError as error:
        p.error(f"argument {flag(error.name)}: use {error.rule}, not {typed(error.value)}")
    except ValueError as error:  # a combination of flags: its message names them
        p.error(str(error))


def check_combinations(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the flags need of each other (each flag's own value is checked by its ``type``)."""
    if args.report_steps and not set(args.report_steps) <= set(args.steps):
        p.error(
            f"argument --report-steps: use step counts among --steps ({typed(args.steps)}), "
            f"not {typed(args.report_steps)}"
        )
    if args.comfy_checkpoint and not args.prompts:
        p.error("argument --prompts: give a text file with one prompt per line (--comfy-checkpoint needs it)")
    if args.reward == "feature" and not (args.feature_factory and args.feature_weights):
        p.error("give --feature-factory and --feature-weights with --reward feature")
    if args.mode == CALIBRATE and args.bed and len(args.bed) > 1:
        p.error("--mode calibrate fits one model: give one --bed, or --comfy-checkpoint")


def check_checkpoint(args: argparse.Namespace) -> None:
    """ComfyUI, the checkpoint and the scheduler, before any model is loaded."""
    try:
        checkpoint_path(args.comfy_checkpoint, args.comfyui)
    except ImportError as error:
        raise SystemExit(
            f"error: give --comfyui (or set COMFYUI_PATH) the folder of a ComfyUI install: {error}"
        ) from None
    except CheckpointNotFound as error:
        raise SystemExit(
            f"error: give --comfy-checkpoint a checkpoint file, or the name of one in {', '.join(error.folders)}: "
            f"{error.checkpoint} is neither"
        ) from None
    import comfy.samplers

    if args.scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise SystemExit(
            f"error: set --scheduler to one of ComfyUI's schedulers ({', '.join(comfy.samplers.SCHEDULER_NAMES)}), "
            f"not {args.scheduler}"
        )


def model_family(families: dict[str, str], override: str | None) -> str:
    """The family the file records, from {model: family}: ``fashion-eps`` for one bed, ``fashion+gmm-eps`` for a mix,
    or ``--model-family`` when given. Refuses eps and flow models in one run and an override of the other kind."""
    kinds = {name: model_kind(family) for name, family in families.items()}
    if len(set(kinds.values())) != 1:
        listed = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
        raise SystemExit(f"error: give --bed models of one kind per run (a file serves eps or flow models): {listed}")
    kind = next(iter(kinds.values()))
    if override is not None:
        if model_kind(override) != kind:
            example = f"{override.rsplit('-', 1)[0]}-{kind}"
            raise SystemExit(
                f"error: set --model-family to a name ending in -{kind} (the models trained are {kind} models), "
                f"e.g. {example}, not {override}"
            )
        return override
    names = sorted(set(families.values()))
    if len(names) == 1:
        return names[0]
    return "+".join(f.rsplit("-", 1)[0] for f in names) + f"-{kind}"


@dataclass(frozen=True)
class RunPaths:
    output: Path
    checkpoint: Path
    report_dir: Path
    references: Path


def unwritable(folder: Path) -> str | None:
    """Why no file can be written into ``folder`` (created when missing), found by writing one; None if it can."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def run_paths(args: argparse.Namespace) -> RunPaths:
    """Where the run writes, each checked (and its folder created) before any work, so that no training is lost to
    a path it cannot write."""
    output = Path(args.output)
    if output.is_dir():
        raise SystemExit(
            f"error: set --output to a file in that folder, e.g. {output / 'coefficients.safetensors'}, "
            f"not the folder {output}"
        )
    if output.suffix != ".safetensors":
        raise SystemExit(
            f"error: set --output to a file name ending in .safetensors (ComfyUI lists only those), e.g. "
            f"{output.with_suffix('.safetensors')}, not {output}"
        )
    paths = RunPaths(
        output=output,
        checkpoint=Path(args.checkpoint) if args.checkpoint else Path(f"{output}.ckpt"),
        report_dir=Path(args.report_dir) if args.report_dir else output.with_suffix(""),
        references=Path(args.references_dir) if args.references_dir else reference_cache_dir(),
    )
    if paths.checkpoint.is_dir():
        raise SystemExit(f"error: set --checkpoint to a file name, not the folder {paths.checkpoint}")
    if paths.report_dir.exists() and not paths.report_dir.is_dir():
        raise SystemExit(f"error: set --report-dir to a folder: {paths.report_dir} is a file")
    if len({paths.output.resolve(), paths.checkpoint.resolve(), paths.report_dir.resolve()}) < 3:
        raise SystemExit("error: give --output, --checkpoint and --report-dir three different paths")
    folders = [
        ("--output", paths.output.parent),
        ("--checkpoint", paths.checkpoint.parent),
        ("--report-dir", paths.report_dir),
        ("--references-dir", paths.references),
    ]
    for name, folder in folders:
        problem = unwritable(folder)
        if problem is not None:
            raise SystemExit(f"error: make {folder} a writable folder or choose another {name}: {problem}")
    for name, path in (("--output", paths.output), ("--checkpoint", paths.checkpoint)):
        if path.exists() and not os.access(path, os.W_OK):
            raise SystemExit(f"error: make {path} writable or choose another {name}: it is read-only")
    return paths


def check_resume(args: argparse.Namespace, config: TrainConfig, checkpoint: Path) -> None:
    """--resume needs a checkpoint of this run's settings; a new run says which checkpoint it will replace."""
    if not args.resume:
        if checkpoint.exists() and distributed.rank() == 0:
            print(f"note: starting a new run; its first checkpoint replaces {checkpoint} (--resume continues it)")
        return
    try:
        read_checkpoint(checkpoint, config)
    except CheckpointMismatch as error:
        stored = " ".join(f"{flag(name)} {typed(old)}" for name, (old, _) in error.differences.items())
        asked = " ".join(f"{flag(name)} {typed(new)}" for name, (_, new) in error.differences.items())
        raise SystemExit(
            f"error: resume with {stored}, as the checkpoint {checkpoint} was written, or leave out --resume to start "
            f"a new run; this run asks {asked}"
        ) from error
    except CheckpointError as error:
        if not checkpoint.exists():
            raise SystemExit(
                f"error: leave out --resume to start a new run, or give --checkpoint the file to continue from: "
                f"there is no checkpoint {checkpoint}"
            ) from error
        raise SystemExit(
            f"error: leave out --resume to start a new run (it replaces the file), or give --checkpoint an intact "
            f"checkpoint: {error}"
        ) from error


def build_problems(args: argparse.Namespace) -> tuple[list[Problem], list[str]]:
    settings = ReferenceSettings(
        args.reference_method, args.reference_steps, args.train_count, args.held_out_count, args.references_dir
    )
    if args.comfy_checkpoint:
        try:
            problem = comfy_problem(checkpoint_request(args), settings)
        except NoPrompts:
            raise SystemExit(
                f"error: give --prompts a text file with one prompt per line: {args.prompts} has none"
            ) from None
        return [problem], [problem.bed.name]
    encoder = None
    if args.reward == "feature":
        encoder = load_feature_encoder(args.feature_factory, args.feature_weights)
    reward = make_reward(args.reward, encoder=encoder)
    mixture_settings = settings
    if args.mixture_train_count is not None:
        mixture_settings = dataclasses.replace(settings, train_count=args.mixture_train_count)
    problems = [bed_problem(name, reward, mixture_settings if name in GMM_BEDS else settings) for name in args.bed]
    return problems, list(args.bed)


def checkpoint_request(args: argparse.Namespace) -> CheckpointRequest:
    return CheckpointRequest(
        args.comfy_checkpoint,
        Path(args.prompts).read_text(),
        negative=args.negative,
        cfg=args.cfg,
        scheduler=args.scheduler,
        width=args.width,
        height=args.height,
        reward=args.reward,
        comfyui=args.comfyui,
    )


def calibrate_main(args: argparse.Namespace, command: str) -> None:
    """``--mode calibrate``: forward-only calibration of one bed or checkpoint, its file and a held-out report."""
    if args.comfy_checkpoint:
        try:
            bed, _ = comfy_model(checkpoint_request(args))
        except NoPrompts:
            raise SystemExit(f"{args.prompts} has no prompts") from None
        name = bed.name
    else:
        bed, name = get_testbed(args.bed[0]), args.bed[0]
    steps = tuple(sorted(set(args.steps)))
    refine = Refine(reference_sampler, bed.sigmas(args.reference_steps), f"the {args.reference_steps}-step reference")
    try:
        calibration = calibrate_bed(bed, steps, args.budget, refine=refine)
    except ValueError as error:  # BudgetTooSmall and target problems, raised before any model call
        raise SystemExit(f"error: {error}") from error
    training = {"command": command, "mode": CALIBRATE, "trained_on": [name], **calibration.summary()}
    description = args.description or (
        f"ConsistencySolver table calibrated forward-only on {name} for {', '.join(map(str, steps))} steps, "
        f"with a schedule, in {calibration.model_calls} model calls"
    )
    family = args.model_family or bed.model_family
    save_coefficients(args.output, calibration.coefficients, model_family=family, description=description,
                      training=training)  # fmt: skip
    report_steps = tuple(args.report_steps or steps)
    noise, labels = seeded_batch(bed, held_out_seeds(args.held_out_count))
    rows = judge(bed, refine, {CALIBRATED: calibration.coefficients}, noise, labels, report_steps)
    ratios = {n: dict(zip(("ratio", "best_stock"), ratio_to_best_stock(rows, CALIBRATED, n), strict=True))
              for n in report_steps}  # fmt: skip
    report = {**training, "held_out_count": args.held_out_count, "held_out_rmse": rows, "ratios": ratios}
    report_dir = Path(args.report_dir) if args.report_dir else Path(args.output).with_suffix("")
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    print(json.dumps({"output": args.output, "report": str(report_dir), **calibration.summary(), "ratios": ratios},
                     indent=2))  # fmt: skip


def train_or_explain(
    config: TrainConfig, problems: list[Problem], args: argparse.Namespace, checkpoint: Path, started: float
) -> TrainState:
    """``train``, with a Ctrl-C or a checkpoint that cannot be written worded as what to do next."""
    try:
        return train(
            config,
            problems,
            checkpoint=checkpoint,
            resume=args.resume,
            progress=not args.no_progress,
            run_started=started,
        )
    except KeyboardInterrupt:
        if checkpoint.exists():
            raise SystemExit(
                f"interrupted: run the same command with --resume to continue from the checkpoint {checkpoint}"
            ) from None
        raise SystemExit("interrupted before the first checkpoint; nothing was saved") from None
    except CheckpointWriteError as error:
        then = "again" if error.saved_update is None else f"with --resume to continue from update {error.saved_update}"
        raise SystemExit(
            f"error: free disk space or make {checkpoint.parent} writable, then run the same command {then}: {error}"
        ) from error


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    # Every flag, path and checkpoint is checked before any reference is built.
    check_combinations(p, args)
    if args.comfy_checkpoint:
        check_checkpoint(args)
    if args.mode == CALIBRATE:
        run_paths(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        calibrate_main(args, shlex.join(["python", "-m", "consistency_solver.training", *argv]))
        return
    config = checked_config(p, args)
    families = None if args.comfy_checkpoint else {name: get_testbed(name).model_family for name in args.bed}
    family = None if families is None else model_family(families, args.model_family)
    paths = run_paths(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed.initialise()
    check_resume(args, config, paths.checkpoint)
    leader = distributed.rank() == 0
    command = shlex.join(["python", "-m", "consistency_solver.training", *argv])
    if leader:
        print(json.dumps({"command": command, "config": config.as_dict()}, indent=2), flush=True)
    started = time.perf_counter()
    problems, names = build_problems(args)
    if family is None:
        family = model_family({problems[0].bed.name: problems[0].bed.model_family}, args.model_family)
    references_seconds = time.perf_counter() - started
    state = train_or_explain(config, problems, args, paths.checkpoint, started)
    distributed.barrier()
    if leader:
        held_out = evaluate_policy(state, problems, config)
        trained = coefficients(state.policy, config, state.schedule)
        training = {
            "command": command,
            "seed": config.seed,
            "mode": config.mode,
            "inference_mode": getattr(trained, "mode", None),  # a table has no read-out
            "schedule": config.schedule,
            "form": config.form,
            "trained_on": names,
            "updates": state.update,
            "model_evaluations": state.evaluations,
            "forward_model_evaluations": state.forward_evaluations,
            "final_training_reward": state.history[-1]["reward"] if state.history else None,
            "held_out_rmse": {str(n): v for n, v in held_out.items()},
            "reward": args.reward,
            "references": f"{args.reference_method}, {args.reference_steps} steps",
            "world_size": distributed.world(),
            "seconds": round(state.seconds, 1),  # over all runs of a resumed run
        }
        description = args.description or (
            f"ConsistencySolver {config.form} trained by {config.mode} on {', '.join(names)} "
            f"for {format_steps(config.steps)} steps"
            + (", with a learned schedule" if config.schedule == "learned" else "")
        )
        rerun = (
            "then run the same command with --resume: it writes the file and the report from the checkpoint "
            f"{paths.checkpoint}"
        )
        try:
            save_coefficients(paths.output, trained, model_family=family, description=description, training=training)
        except OSError as error:
            raise SystemExit(
                f"error: free disk space or make {paths.output.parent} writable, {rerun} without training again; "
                f"writing --output {paths.output} failed: {error.strerror or error}"
            ) from error
        try:
            report = write_report(
                paths.report_dir,
                state,
                problems,
                names,
                config,
                {**training, "reference_seconds": round(references_seconds, 1)},
                list(args.report_steps or config.steps),
            )
        except OSError as error:
            raise SystemExit(
                f"error: free disk space or make {paths.report_dir} writable, {rerun} without training again; "
                f"{paths.output} is written, the report in --report-dir {paths.report_dir} failed: "
                f"{error.strerror or error}"
            ) from error
        print(
            json.dumps(
                {"output": str(paths.output), "report": str(paths.report_dir), "ratios": report["ratios"]}, indent=2
            )
        )
    # Every rank leaves together: a rank that tears its gloo group down while the leader still writes can abort.
    distributed.barrier()
    distributed.finalise()


if __name__ == "__main__":
    main()
