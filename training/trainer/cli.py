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
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ...solver import format_steps, save_coefficients
from ...solver.coefficients import ROW_SUMS
from ...solver.files import model_kind
from ..evaluation.calibrated import CALIBRATED, calibrate_bed, held_out_comparison, ratios_to_best_stock
from ..evaluation.references import REFERENCE_METHODS
from ..testbeds import TESTBED_NAMES, get_testbed
from . import distributed
from .comfy_model import CheckpointRequest, NoPrompts, comfy_model, comfy_problem
from .data import ReferenceSettings, bed_problem
from .loop import (
    FORMS,
    LR_SCHEDULES,
    MODES,
    SCHEDULES,
    Problem,
    TrainConfig,
    coefficients,
    evaluate_policy,
    train,
)
from .ppo import PPOSettings
from .report import write_report
from .rewards import REWARD_NAMES, load_feature_encoder, make_reward

CALIBRATE = "calibrate"  # forward-only calibration (training.calibration), not a TrainConfig mode


def step_range(text: str) -> tuple[int, ...]:
    """``4-12`` or ``4,5,8`` -> step counts."""
    try:
        if "-" in text:
            low, high = (int(part) for part in text.split("-"))
            return tuple(range(low, high + 1))
        return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"step counts look like 4-12 or 4,5,8, got {text!r}") from error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="consistency-solver-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = p.add_argument_group("what to train for (give --bed, or --comfy-checkpoint)")
    source.add_argument("--bed", action="append", choices=TESTBED_NAMES, help="built-in test bed; repeat to mix beds")
    source.add_argument("--comfy-checkpoint", help="a ComfyUI checkpoint file (path or name in models/checkpoints)")
    source.add_argument("--comfyui", help="the ComfyUI install (default: $COMFYUI_PATH or /opt/ComfyUI)")
    source.add_argument("--prompts", help="text file, one prompt per line (ComfyUI backend)")
    source.add_argument("--negative", default="", help="negative prompt (ComfyUI backend)")
    source.add_argument("--cfg", type=float, default=3.0, help="CFG scale (ComfyUI backend; the paper: 3)")
    source.add_argument("--scheduler", default="simple", help="ComfyUI scheduler for the sigmas (ComfyUI backend)")
    source.add_argument("--width", type=int, default=512)
    source.add_argument("--height", type=int, default=512)
    source.add_argument("--device", help="torch device for the model (default: cuda when present, else cpu)")

    method = p.add_argument_group("optimisation")
    method.add_argument(
        "--mode",
        choices=(*MODES, CALIBRATE),
        default="ppo",
        help="ppo (the paper), direct (fast, back-propagates through the model) or calibrate (forward-only, within "
        "--budget model calls: one bed or checkpoint)",
    )
    method.add_argument(
        "--budget", type=int, default=3000, help="calibrate: most model calls, the reference runs included"
    )
    method.add_argument(
        "--calibration-noises", type=int, default=24, help="calibrate: noises with a reference run (training seeds)"
    )
    method.add_argument(
        "--jacobian-noises", type=int, default=8, help="calibrate: noises of each finite-difference Jacobian"
    )
    method.add_argument("--steps", type=step_range, default=tuple(range(4, 13)), help="step counts (default 4-12)")
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

    data = p.add_argument_group("references and reward")
    data.add_argument("--reward", choices=REWARD_NAMES, default="rmse")
    data.add_argument("--feature-factory", help="feature reward: 'package.module:function' building the encoder")
    data.add_argument("--feature-weights", help="feature reward: local weights file or folder")
    data.add_argument("--reference-method", choices=REFERENCE_METHODS, default="multistep")
    data.add_argument("--reference-steps", type=int, default=40)
    data.add_argument("--train-count", type=int, default=256, help="training noises (seeds below 10000)")
    data.add_argument("--held-out-count", type=int, default=128, help="held-out noises (seeds 10000 and up)")
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
    run.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    run.add_argument("--report-dir", help="where report.json and report.png go (default: next to --output)")
    run.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N updates (0: off)")
    run.add_argument(
        "--report-steps",
        type=step_range,
        help="step counts of the held-out evaluation (default 5,8, those of them in --steps) and of the report "
        "(default: --steps)",
    )
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
        order=args.order,
        bins=args.bins,
        hidden=args.hidden,
        seed=args.seed,
        ppo=PPOSettings(args.rollouts, args.epochs, args.clip, args.entropy_coef, args.std_floor),
        eval_steps=tuple(args.report_steps or (5, 8)),
        eval_every=args.eval_every,
        gradient_checkpointing=args.gradient_checkpointing,
        schedule=args.schedule,
        form=args.form,
        lr_schedule=args.lr_schedule,
        row_sums=args.row_sums,
    )


def model_family(problems: list[Problem]) -> str:
    """``fashion-eps`` for one bed, ``fashion+gmm-eps`` for a mix; mixing eps and flow models is refused."""
    families = sorted({p.bed.model_family for p in problems})
    kinds = {model_kind(f) for f in families}
    if len(kinds) != 1:
        raise SystemExit(f"cannot train one policy for eps and flow models together ({', '.join(families)})")
    if len(families) == 1:
        return families[0]
    return "+".join(f.rsplit("-", 1)[0] for f in families) + f"-{kinds.pop()}"


def build_problems(args: argparse.Namespace) -> tuple[list[Problem], list[str]]:
    settings = ReferenceSettings(
        args.reference_method, args.reference_steps, args.train_count, args.held_out_count, args.references_dir
    )
    if args.comfy_checkpoint:
        try:
            problem = comfy_problem(checkpoint_request(args), settings)
        except NoPrompts:
            raise SystemExit(f"{args.prompts} has no prompts") from None
        return [problem], [problem.bed.name]
    if not args.bed:
        raise SystemExit("give --bed (a built-in test bed) or --comfy-checkpoint (a ComfyUI model)")
    encoder = None
    if args.reward == "feature":
        if not (args.feature_factory and args.feature_weights):
            raise SystemExit("--reward feature needs --feature-factory and --feature-weights")
        encoder = load_feature_encoder(args.feature_factory, args.feature_weights)
    reward = make_reward(args.reward, encoder=encoder)
    return [bed_problem(name, reward, settings) for name in args.bed], list(args.bed)


def checkpoint_request(args: argparse.Namespace) -> CheckpointRequest:
    if not args.prompts:
        raise SystemExit("--comfy-checkpoint needs --prompts (a text file with one prompt per line)")
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
    elif args.bed and len(args.bed) == 1:
        bed, name = get_testbed(args.bed[0]), args.bed[0]
    else:
        raise SystemExit("--mode calibrate fits one model: give one --bed, or --comfy-checkpoint")
    steps = tuple(sorted(set(args.steps)))
    try:
        calibration = calibrate_bed(
            bed, steps, args.budget, args.calibration_noises, args.jacobian_noises, args.reference_steps
        )
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
    rows = held_out_comparison(bed, {CALIBRATED: calibration.coefficients}, report_steps, args.held_out_count)
    report = {
        **training,
        "held_out_count": args.held_out_count,
        "held_out_rmse": rows,
        "ratios": ratios_to_best_stock(rows),
    }
    report_dir = Path(args.report_dir) if args.report_dir else Path(args.output).with_suffix("")
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    print(json.dumps({"output": args.output, "report": str(report_dir), **calibration.summary(),
                      "ratios": report["ratios"]}, indent=2))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == CALIBRATE:
        calibrate_main(args, shlex.join(["python", "-m", "consistency_solver.training", *argv]))
        return
    distributed.initialise()
    leader = distributed.rank() == 0
    try:
        config = config_from(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    command = shlex.join(["python", "-m", "consistency_solver.training", *argv])
    if leader:
        print(json.dumps({"command": command, "config": config.as_dict()}, indent=2), flush=True)
    started = time.perf_counter()
    problems, names = build_problems(args)
    references_seconds = time.perf_counter() - started
    checkpoint = args.checkpoint or f"{args.output}.ckpt"
    state = train(config, problems, checkpoint=checkpoint, resume=args.resume, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    distributed.barrier()
    if leader:
        family = args.model_family or model_family(problems)
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
            "seconds": round(seconds, 1),
        }
        description = args.description or (
            f"ConsistencySolver {config.form} trained by {config.mode} on {', '.join(names)} "
            f"for {format_steps(config.steps)} steps"
            + (", with a learned schedule" if config.schedule == "learned" else "")
        )
        save_coefficients(args.output, trained, model_family=family, description=description, training=training)
        report_dir = Path(args.report_dir) if args.report_dir else Path(args.output).with_suffix("")
        report = write_report(
            report_dir,
            state,
            problems,
            names,
            config,
            {**training, "reference_seconds": round(references_seconds, 1)},
            list(args.report_steps or config.steps),
        )
        print(json.dumps({"output": args.output, "report": str(report_dir), "ratios": report["ratios"]}, indent=2))
    distributed.finalise()


if __name__ == "__main__":
    main()
