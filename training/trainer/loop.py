"""The training loop: plan an update, roll out, score, update the policy, checkpoint, evaluate, export.

Determinism: everything random in update ``u`` comes from generators seeded by (seed, u, group), and
the plan of an update (which problem, which sample, which step count) is drawn identically on every
rank. So a run is a pure function of its seed and config, a resumed run equals an uninterrupted one,
and a ``torchrun`` run equals a single-process run with the same config (only float summation order
differs).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...solver import ConsistencyPolicy, PolicyCoefficients, check_choice
from ...solver.coefficients import ROW_SUMS, CoefficientSource
from ...solver.policy import LAST_STEPS
from ..evaluation.evaluator import Sampler, preview_rmse, solver_sampler
from ..testbeds import GMMTestBed, run_sigmas
from . import distributed
from .direct import direct_loss
from .ppo import Group, PPOSettings, group_advantages, group_loss, log_probs_and_entropy
from .rewards import Reward
from .rollout import (
    active_actions,
    expected_weights,
    indices_to_weights,
    sample_action_indices,
    step_features,
    unroll,
)
from .schedule import LearnedSchedule
from .table import WeightTable

MODES = ("ppo", "direct")
# "given": the bed's (or the ComfyUI scheduler's) sigmas; "learned": a schedule trained with the weights.
SCHEDULES = ("given", "learned")
# "policy": the paper's network of the step times; "table": free weights per step count (direct mode).
FORMS = ("policy", "table")
LR_SCHEDULES = ("constant", "cosine")
# The released code's inference read-out differs per mode: PPO learns a sharp categorical (argmax),
# the direct mode optimises the expectation itself.
INFERENCE_MODE = {"ppo": "mode", "direct": "expectation"}
# A backward pass through a model call costs about two forward calls; the cost we report counts it so.
BACKWARD_COST = 2
# What a resumed run may change: neither alters a single update's result.
RESUMABLE_CHANGES = ("updates", "checkpoint_every")


class SettingError(ValueError):
    """A training setting no run can train with: the setting (a TrainConfig or PPOSettings field), its value and
    what it must be."""

    def __init__(self, name: str, value: Any, rule: str):
        super().__init__(f"{name} must be {rule}, got {value!r}")
        self.name, self.value, self.rule = name, value, rule


class CheckpointError(ValueError):
    """A checkpoint a run cannot resume from: the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"checkpoint {os.fspath(path)!r} cannot be resumed: {problem}")
        self.path, self.problem = os.fspath(path), problem


class CheckpointMismatch(ValueError):
    """A checkpoint written with other settings: {setting: (stored, requested)} for those that differ."""

    def __init__(self, path: str | os.PathLike, differences: dict[str, tuple[Any, Any]]):
        listed = ", ".join(
            f"{name} {stored!r} (requested {requested!r})" for name, (stored, requested) in differences.items()
        )
        super().__init__(f"checkpoint {os.fspath(path)!r} was written with a different configuration: {listed}")
        self.path, self.differences = os.fspath(path), differences


class CheckpointWriteError(OSError):
    """Writing the checkpoint failed and the run stopped; ``saved_update`` is the update of the last checkpoint this
    run wrote (None: none yet), which stays in place."""

    def __init__(self, path: str | os.PathLike, update: int, saved_update: int | None, reason: str):
        kept = "none was written yet" if saved_update is None else f"the one of update {saved_update} is kept"
        super().__init__(f"writing checkpoint {os.fspath(path)!r} at update {update} failed ({reason}); {kept}")
        self.path, self.update, self.saved_update, self.reason = os.fspath(path), update, saved_update, reason


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "ppo"
    steps: tuple[int, ...] = tuple(range(4, 13))
    updates: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    groups: int = 4  # ppo: groups of rollouts per update
    batch: int = 16  # direct: samples per step count per update
    # direct: the batch of a Gaussian-mixture problem (0: ``batch``). A mixture call is a closed-form matmul, and its
    # error comes from the 0.3-4 % of noises near a mode boundary, which only large batches see.
    mixture_batch: int = 0
    # direct: the share of groups drawn from the Gaussian-mixture beds of a mix that has other beds too (0: every
    # bed alike), so that several cheap mixtures do not crowd out the learned beds.
    mixture_share: float = 0.0
    order: int = 4
    bins: int = 21
    hidden: int = 256
    time_features: str = "log_sigma"
    seed: int = 0
    ppo: PPOSettings = field(default_factory=PPOSettings)
    eval_steps: tuple[int, ...] = (5, 8)
    eval_every: int = 0  # 0: evaluate held-out only before and after training
    checkpoint_every: int = 10  # a crash or Ctrl-C loses at most this many updates
    gradient_checkpointing: bool = False
    schedule: str = "given"
    form: str = "policy"
    lr_schedule: str = "constant"  # or "cosine": decay to 0 over the run, so a late noisy step cannot undo it
    row_sums: str = "one"
    last_step: str = "learned"  # LAST_STEPS: the policy's row at the step to sigma = 0, or the denoised estimate

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("lr schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("form", self.form, FORMS)
        check_choice("row sums", self.row_sums, ROW_SUMS)
        check_choice("last step", self.last_step, LAST_STEPS)
        if self.last_step != "learned" and self.form != "policy":
            raise ValueError(
                "a weight table learns every row, the last one too (a denoised last step is a setting of the "
                "policy); use --form policy with --last-step denoised"
            )
        if self.row_sums == "free" and self.form != "table":
            raise ValueError(
                "free row sums are learned per step of a weight table (the paper's policy keeps rows summing to 1); "
                "use --form table with --row-sums free"
            )
        if self.form == "table" and self.mode != "direct":
            raise ValueError(
                "a free weight table is trained by the direct mode's gradient (PPO samples the policy's actions); "
                "use --mode direct with --form table"
            )
        if self.schedule == "learned" and self.mode != "direct":
            raise ValueError(
                "a learned schedule needs the gradient of the direct mode (PPO samples the weights only); "
                "use --mode direct with --schedule learned"
            )
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Refuse numbers no run can train with (a NaN or negative learning rate, an empty batch, ...)."""
        if not self.steps or min(self.steps) < 1:
            raise SettingError("steps", self.steps, "one or more step counts of at least 1")
        if self.eval_steps and min(self.eval_steps) < 1:
            raise SettingError("eval_steps", self.eval_steps, "step counts of at least 1")
        values = self.settings()
        at_least = {
            1: ("updates", "groups", "batch", "hidden", "checkpoint_every", "epochs"),
            2: ("order", "bins", "rollouts"),
        }
        for minimum, names in at_least.items():
            for name in names:
                if values[name] < minimum:
                    raise SettingError(name, values[name], f"a whole number of at least {minimum}")
        if self.eval_every < 0:
            raise SettingError("eval_every", self.eval_every, "0 (off) or a whole number of updates")
        if self.mixture_batch < 0:
            raise SettingError("mixture_batch", self.mixture_batch, "0 (as batch) or a whole number of samples")
        if not 0 <= self.mixture_share < 1:
            raise SettingError("mixture_share", self.mixture_share, "0 (every bed alike) or a share below 1")
        for name in ("lr", "grad_clip", "std_floor"):
            if not (math.isfinite(values[name]) and values[name] > 0):
                raise SettingError(name, values[name], "a finite number above 0")
        for name in ("weight_decay", "entropy_coef"):
            if not (math.isfinite(values[name]) and values[name] >= 0):
                raise SettingError(name, values[name], "a finite number of at least 0")
        if not 0 < self.ppo.clip < 1:
            raise SettingError("clip", self.ppo.clip, "a number between 0 and 1")

    def settings(self) -> dict[str, Any]:
        """Every setting by name, the PPO ones (``rollouts``, ``clip``, ...) among them."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ppo"}
        return values | dataclasses.asdict(self.ppo)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        values["ppo"] = PPOSettings(**values["ppo"])
        for key in ("steps", "eval_steps"):
            values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class ReferenceSet:
    """Fixed starting noises, their conditions (labels or None) and the reference finals from the same noises."""

    noises: torch.Tensor
    labels: torch.Tensor | None
    finals: torch.Tensor

    def __len__(self) -> int:
        return len(self.noises)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        labels = None if self.labels is None else self.labels[index]
        return self.noises[index], labels, self.finals[index]


@dataclass
class Problem:
    """One model to train for: a test bed (or anything with its interface) and its reference sets."""

    bed: Any  # .model(labels), .sigmas(steps), .sigma_min/.sigma_max, .initial_state(noise, sigmas), .model_family
    train: ReferenceSet
    held_out: ReferenceSet
    reward: Reward
    sigma_to_timestep: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class TrainState:
    policy: ConsistencyPolicy | WeightTable
    optimizer: torch.optim.Optimizer
    schedule: LearnedSchedule | None = None
    update: int = 0
    evaluations: int = 0  # model evaluations per sample (a CFG'd call counts once), backward included
    forward_evaluations: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # wall time spent on this state over all runs, up to its last update


def build_policy(config: TrainConfig) -> ConsistencyPolicy | WeightTable:
    """What is trained: the paper's policy network, or free weight tables (``form``)."""
    if config.form == "table":
        return WeightTable(config.steps, config.order, free_row_sums=config.row_sums == "free")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return ConsistencyPolicy(order=config.order, bins=config.bins, hidden=config.hidden)


def new_state(config: TrainConfig, problems: list[Problem]) -> TrainState:
    """A fresh policy (and schedule, started from the first problem's default schedule) and their optimizer."""
    policy = build_policy(config)
    groups = [{"params": list(policy.parameters())}]
    schedule = None
    if config.schedule == "learned":
        schedule = LearnedSchedule.from_default(problems[0].bed, config.steps)
        # No weight decay on the schedule: it would pull every schedule towards log-uniform spacing.
        groups.append({"params": list(schedule.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return TrainState(policy=policy, optimizer=optimizer, schedule=schedule)


def trainable_parameters(state: TrainState) -> list[torch.nn.Parameter]:
    schedule = [] if state.schedule is None else list(state.schedule.parameters())
    return [*state.policy.parameters(), *schedule]


def generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for one purpose of one update: seeded from the run seed and the given keys."""
    mixed = seed
    for key in keys:
        mixed = (mixed * 1_000_003 + key + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def coefficients(
    policy: ConsistencyPolicy | WeightTable, config: TrainConfig, schedule: LearnedSchedule | None = None
) -> CoefficientSource:
    """The policy or table (and its learned schedule, if any) as the sampler and the coefficient file see it."""
    exported = None if schedule is None else schedule.export()
    if isinstance(policy, WeightTable):
        return policy.export(exported)
    return PolicyCoefficients(
        policy=policy,
        time_features=config.time_features,
        trained_steps=tuple(sorted(config.steps)),
        mode=INFERENCE_MODE[config.mode],
        last_step=config.last_step,
        schedule=exported,
    )


# --- rolling out and updating -----------------------------------------------------------------------


@dataclass(frozen=True)
class GroupPlan:
    problem: int
    samples: tuple[int, ...]
    steps: int
    key: int  # seeds this group's action draws


def plan_update(config: TrainConfig, problems: list[Problem], update: int) -> list[GroupPlan]:
    """What update ``update`` works on, the same on every rank.

    PPO: ``groups`` groups, each one training sample at a random step count. Direct: one batch of
    ``batch`` samples (``mixture_batch`` on a Gaussian mixture) for *every* step count, so each gradient weighs
    all step counts alike (one shared network serves them all, and single-count steps pull it back and forth);
    with ``mixture_share`` that share of the batches comes from the mixtures of a mix.
    """
    rng = generator(config.seed, update, 0)
    mixtures = [i for i, problem in enumerate(problems) if isinstance(problem.bed, GMMTestBed)]
    others = [i for i in range(len(problems)) if i not in mixtures]
    if config.mode == "ppo":
        draws = torch.randint(len(config.steps), (config.groups,), generator=rng)
        counts = [config.steps[int(i)] for i in draws]
        size = 1
    else:
        counts, size = list(config.steps), config.batch
    plans = []
    for key, steps in enumerate(counts):
        if config.mode == "direct" and config.mixture_share and mixtures and others:
            pool = mixtures if float(torch.rand((), generator=rng)) < config.mixture_share else others
            problem = pool[int(torch.randint(len(pool), (1,), generator=rng))]
        else:
            problem = int(torch.randint(len(problems), (1,), generator=rng))
        mixture = config.mode == "direct" and problem in mixtures
        batch = config.mixture_batch if mixture and config.mixture_batch else size
        samples = torch.randint(len(problems[problem].train), (batch,), generator=rng)
        plans.append(GroupPlan(problem, tuple(samples.tolist()), steps, key + 1))
    return plans


def roll_out_group(
    policy: ConsistencyPolicy, problem: Problem, plan: GroupPlan, config: TrainConfig, update: int
) -> Group:
    """``rollouts`` previews of one (condition, noise, steps) with per-rollout sampled actions, scored."""
    rollouts = config.ppo.rollouts
    sigmas = problem.bed.sigmas(plan.steps)
    features = step_features(sigmas, config.time_features, problem.sigma_to_timestep)
    with torch.no_grad():
        logits = policy(features)
        indices = sample_action_indices(logits, rollouts, generator(config.seed, update, plan.key))
        active = active_actions(policy.order, sigmas, config.last_step)
        old_log_probs, _ = log_probs_and_entropy(logits, indices, active)
        noise, labels, final = problem.train.take(torch.tensor(plan.samples))
        repeat = (rollouts,) + (1,) * (noise.dim() - 1)
        labels = None if labels is None else labels.repeat(rollouts)
        x = problem.bed.initial_state(noise.repeat(repeat), sigmas)
        weights = indices_to_weights(policy, indices, sigmas, config.last_step)
        previews = unroll(problem.bed.model(labels), x, sigmas, weights)
        rewards = problem.reward(previews, final.to(previews.device, previews.dtype).expand_as(previews)).double()
    advantages = group_advantages(rewards, config.ppo.std_floor).float()
    return Group(features, indices, active, old_log_probs, advantages, rewards)


def reduced_step(state: TrainState, loss: torch.Tensor, config: TrainConfig) -> None:
    state.optimizer.zero_grad(set_to_none=False)
    loss.backward()
    distributed.all_reduce_gradients(state.policy)
    torch.nn.utils.clip_grad_norm_(trainable_parameters(state), config.grad_clip)
    state.optimizer.step()


def ppo_update(state: TrainState, problems: list[Problem], plans: list[GroupPlan], config: TrainConfig) -> float:
    """Roll out this rank's groups, then ``epochs`` clipped updates; returns the mean reward over all ranks."""
    mine = distributed.shard(plans)
    groups = [roll_out_group(state.policy, problems[p.problem], p, config, state.update) for p in mine]
    for _ in range(config.ppo.epochs):
        loss = sum((group_loss(state.policy, g, config.ppo) for g in groups), torch.zeros(()))
        reduced_step(state, loss / len(plans), config)
    reward_sum = sum(float(g.rewards.mean()) for g in groups)
    return distributed.all_reduce_sum(reward_sum) / len(plans)


def direct_update(state: TrainState, problems: list[Problem], plans: list[GroupPlan], config: TrainConfig) -> float:
    """One gradient step on the batches of all step counts; returns the mean reward over them."""
    state.optimizer.zero_grad(set_to_none=False)
    reward_sum = 0.0
    for plan in plans:
        problem = problems[plan.problem]
        if state.schedule is None:
            sigmas = problem.bed.sigmas(plan.steps)
        else:
            sigmas = state.schedule.sigmas(plan.steps, problem.bed)
        if isinstance(state.policy, WeightTable):
            weights = state.policy.weights(plan.steps)
        else:
            features = step_features(sigmas, config.time_features, problem.sigma_to_timestep)
            weights = expected_weights(state.policy, features, sigmas, config.last_step)
        noise, labels, finals = problem.train.take(torch.tensor(distributed.shard(list(plan.samples))))
        loss, rewards = direct_loss(
            weights,
            problem.bed.model(labels),
            problem.bed.initial_state(noise, sigmas),
            sigmas,
            finals,
            problem.reward,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        (loss / len(plans)).backward()
        reward_sum += distributed.all_reduce_sum(float(rewards.sum())) / len(plan.samples)
    distributed.all_reduce_gradients(state.policy)
    if state.schedule is not None:
        distributed.all_reduce_gradients(state.schedule)
    clip_gradients(state, config)
    state.optimizer.step()
    return reward_sum / len(plans)


def clip_gradients(state: TrainState, config: TrainConfig) -> None:
    """Clip the direct mode's gradient to ``grad_clip``: as a whole for the shared policy network, per step count
    for a table (each step count's share of the norm), whose step counts share no parameter. A joint clip lets a
    batch with a few mode-boundary noises at one step count shrink every other step count's update; clipped per
    step count, a 4-12 step table's 8-step row trains as well as a table trained for 8 steps alone."""
    if not isinstance(state.policy, WeightTable):
        torch.nn.utils.clip_grad_norm_(trainable_parameters(state), config.grad_clip)
        return
    for steps in config.steps:
        schedule = [] if state.schedule is None else [state.schedule.logits[f"N{steps}"]]
        parameters = [*state.policy.step_parameters(steps), *schedule]
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip / len(config.steps))


def evaluation_cost(plans: list[GroupPlan], config: TrainConfig) -> tuple[int, int]:
    """(forward model evaluations, evaluation equivalents with backward passes) of one update, per sample."""
    if config.mode == "ppo":
        forward = sum(config.ppo.rollouts * p.steps for p in plans)
        return forward, forward
    forward = sum(len(p.samples) * p.steps for p in plans)
    return forward, forward * (1 + BACKWARD_COST)


# --- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def held_out_rmse(source: CoefficientSource, problem: Problem, steps: int) -> float:
    """Consistency RMSE of the inference sampler with ``source`` (on its learned schedule, if it has one) on the
    problem's held-out noises."""
    sampler_schedule = None if problem.sigma_to_timestep is None else _Timesteps(problem.sigma_to_timestep)
    sigmas = run_sigmas(problem.bed, steps, source.schedule)
    return held_out_sampler_rmse(solver_sampler(source, sampler_schedule), problem, sigmas)


def held_out_sampler_rmse(sampler: Sampler, problem: Problem, sigmas: torch.Tensor) -> float:
    """Consistency RMSE of any ``sampler`` on ``sigmas`` on the problem's held-out noises."""
    held_out = problem.held_out
    return preview_rmse(problem.bed, sampler, sigmas, held_out.noises, held_out.labels, held_out.finals)


@dataclass(frozen=True)
class _Timesteps:
    timestep: Callable[[torch.Tensor], torch.Tensor]


def evaluate_policy(state: TrainState, problems: list[Problem], config: TrainConfig) -> dict[int, float]:
    """Held-out RMSE per evaluation step count, averaged over the problems."""
    source = coefficients(state.policy, config, state.schedule)
    steps = [n for n in config.eval_steps if n in config.steps] or list(config.steps)
    return {n: sum(held_out_rmse(source, p, n) for p in problems) / len(problems) for n in steps}


# --- checkpoints and the loop -----------------------------------------------------------------------


CHECKPOINT_KEYS = (
    "config",
    "policy",
    "schedule",
    "optimizer",
    "update",
    "evaluations",
    "forward_evaluations",
    "history",
)


def save_checkpoint(path: str | os.PathLike, state: TrainState, config: TrainConfig) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(f"{os.fspath(path)}.tmp")
    try:
        torch.save(
            {
                "config": config.as_dict(),
                "policy": state.policy.state_dict(),
                "schedule": None if state.schedule is None else state.schedule.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "update": state.update,
                "evaluations": state.evaluations,
                "forward_evaluations": state.forward_evaluations,
                "history": state.history,
                "seconds": state.seconds,
            },
            temporary,
        )
        temporary.replace(path)  # never leave a half-written checkpoint behind
    finally:
        temporary.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike, config: TrainConfig) -> dict[str, Any]:
    """The saved run at ``path``, checked to be a complete checkpoint written with ``config``'s settings (only
    ``RESUMABLE_CHANGES`` may differ). Raises CheckpointError or CheckpointMismatch."""
    if not Path(path).is_file():
        raise CheckpointError(path, "there is no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises EOFError, RuntimeError, KeyError, UnpicklingError, ...
        raise CheckpointError(path, f"it is damaged or not a checkpoint ({type(error).__name__}: {error})") from error
    missing = [key for key in CHECKPOINT_KEYS if key not in saved] if isinstance(saved, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(path, f"it is not a training checkpoint (no {', '.join(missing)})")
    try:
        stored = TrainConfig.from_dict(saved["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(path, f"its configuration cannot be read ({type(error).__name__}: {error})") from error
    requested = config.settings()
    differences = {
        name: (value, requested[name])
        for name, value in stored.settings().items()
        if name not in RESUMABLE_CHANGES and value != requested[name]
    }
    if differences:
        raise CheckpointMismatch(path, differences)
    return saved


def load_checkpoint(path: str | os.PathLike, config: TrainConfig, problems: list[Problem]) -> TrainState:
    """Restore a run; the config must match except for ``RESUMABLE_CHANGES`` (a run may be extended)."""
    saved = read_checkpoint(path, config)
    state = new_state(config, problems)
    try:
        state.policy.load_state_dict(saved["policy"])
        if state.schedule is not None:
            state.schedule.load_state_dict(saved["schedule"])
        state.optimizer.load_state_dict(saved["optimizer"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise CheckpointError(path, f"its tensors do not fit its configuration ({error})") from error
    state.update = saved["update"]
    state.evaluations = saved["evaluations"]
    state.forward_evaluations = saved["forward_evaluations"]
    state.history = saved["history"]
    state.seconds = saved.get("seconds", 0.0)  # checkpoints written before seconds were recorded count from here
    return state


def train(
    config: TrainConfig,
    problems: list[Problem],
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    run_started: float | None = None,
) -> TrainState:
    """Train a policy; with ``checkpoint`` the run is saved every ``checkpoint_every`` updates and at the end.

    ``resume`` continues from ``checkpoint``, which must exist. ``stop_after`` ends the run early after that many
    updates (as an interruption would), leaving a checkpoint to resume from. ``run_started`` is the
    ``time.perf_counter()`` at which this run began (default: now), so that the state's ``seconds`` include what the
    caller did first, such as building the references. A checkpoint that cannot be written stops the run with a
    CheckpointWriteError; the last one written stays in place.
    """
    run_started = time.perf_counter() if run_started is None else run_started
    if resume:
        if checkpoint is None:
            raise ValueError("resume needs the checkpoint to continue from")
        state = load_checkpoint(checkpoint, config, problems)
    else:
        state = new_state(config, problems)
    seconds_before = state.seconds
    saved_update = state.update if resume else None
    leader = distributed.rank() == 0
    if leader and config.eval_every and not state.history:
        state.history.append(
            {"update": 0, "evaluations": 0, "held_out": _mean(evaluate_policy(state, problems, config))}
        )
    last = config.updates if stop_after is None else min(config.updates, stop_after)
    bar = tqdm(range(state.update, last), disable=not (progress and leader), desc=f"training ({config.mode})")
    for update in bar:
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(config, update)
        plans = plan_update(config, problems, update)
        step = ppo_update if config.mode == "ppo" else direct_update
        reward = step(state, problems, plans, config)
        forward, equivalents = evaluation_cost(plans, config)
        state.update = update + 1
        state.forward_evaluations += forward
        state.evaluations += equivalents
        record = {"update": state.update, "reward": reward, "evaluations": state.evaluations}
        if config.eval_every and (state.update % config.eval_every == 0 or state.update == config.updates) and leader:
            record["held_out"] = _mean(evaluate_policy(state, problems, config))
        state.history.append(record)
        state.seconds = seconds_before + time.perf_counter() - run_started
        bar.set_postfix(reward=f"{reward:.4f}", evals=state.evaluations)
        if checkpoint is not None and leader and (state.update % config.checkpoint_every == 0 or state.update == last):
            try:
                save_checkpoint(checkpoint, state, config)
            except OSError as error:
                raise CheckpointWriteError(
                    checkpoint, state.update, saved_update, error.strerror or str(error)
                ) from error
            saved_update = state.update
    return state


def learning_rate(config: TrainConfig, update: int) -> float:
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * update / config.updates))
    return config.lr


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values) if values else math.nan
