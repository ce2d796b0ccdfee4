r"""Train a Fashion-MNIST test bed's denoiser (one of ``ARCHITECTURES``, in one of four parameterisations, on images
or on the fixed latent) or the classifier from a seed and save fp16 EMA weights.

    python -m consistency_solver.training.testbeds.train_networks unet --seed 0 --minutes 72 \
        --out training/testbeds/weights/fashion_unet.safetensors
    python -m consistency_solver.training.testbeds.train_networks unet --parameterisation flow --seed 0 \
        --steps STEPS --out training/testbeds/weights/fashion_flow_unet.safetensors
    python -m consistency_solver.training.testbeds.train_networks unet --parameterisation v --seed 0 \
        --steps STEPS --out training/testbeds/weights/fashion_v_unet.safetensors
    python -m consistency_solver.training.testbeds.train_networks unet --latent --parameterisation eps --seed 0 \
        --steps STEPS --out training/testbeds/weights/fashion_latent_eps_unet.safetensors
    python -m consistency_solver.training.testbeds.train_networks dit --latent --parameterisation flow --seed 0 \
        --steps STEPS --out training/testbeds/weights/fashion_dit_flow.safetensors
    python -m consistency_solver.training.testbeds.train_networks small-dit --latent --parameterisation eps --seed 0 \
        --steps STEPS --out training/testbeds/weights/fashion_dit_eps.safetensors
    python -m consistency_solver.training.testbeds.train_networks attention-unet --latent --parameterisation flow \
        --seed 0 --steps STEPS --out training/testbeds/weights/fashion_latent_flow.safetensors
    python -m consistency_solver.training.testbeds.train_networks classifier --seed 0 \
        --out training/testbeds/weights/fashion_classifier.safetensors

A run stops at ``--steps`` or after ``--minutes``, whichever comes first, and rewrites ``--out`` every
``--checkpoint-minutes`` so an interrupted run still leaves usable weights. The metadata records the
steps taken; rerunning with ``--steps`` set to that number repeats the run. ``evaluation/fashion_quality.py``
scores the result.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...solver.files import write_safetensors
from .fashion import (
    ARCHITECTURES,
    LATENT_ONLY,
    PARAMETERISATIONS,
    SIGMA_DATA,
    VP_SCHEDULE,
    FashionClassifier,
    FashionDenoiser,
    build_denoiser,
    count_parameters,
    denoiser_description,
    edm_scalings,
    encode_latent,
    flow_sigma,
    load_fashion_mnist,
    timestep_feature,
)

# EDM's log-normal training sigmas concentrate around exp(-1.2) ~ 0.3; SD1.5's range reaches 14.6, where
# samplers take their first (largest) steps, so a share of sigmas is drawn log-uniformly over the whole range.
P_MEAN, P_STD = -1.2, 1.2
LOG_UNIFORM_SHARE, LOG_UNIFORM_RANGE = 0.15, (0.02, 20.0)
LABEL_DROPOUT = 0.1
FLOW_UNIFORM_SHARE = 0.15  # of flow training times drawn uniformly, so both ends of [0, 1] are learned


def sample_training_sigmas(count: int, generator: torch.Generator) -> Tensor:
    log_normal = P_MEAN + P_STD * torch.randn(count, generator=generator)
    low, high = (math.log(s) for s in LOG_UNIFORM_RANGE)
    log_uniform = low + (high - low) * torch.rand(count, generator=generator)
    use_uniform = torch.rand(count, generator=generator) < LOG_UNIFORM_SHARE
    return torch.where(use_uniform, log_uniform, log_normal).exp()


def _dropped_labels(net: FashionDenoiser, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Labels with a ``LABEL_DROPOUT`` share replaced by the null class, for classifier-free guidance."""
    dropped = torch.rand(labels.shape, generator=generator) < LABEL_DROPOUT
    return torch.where(dropped, net.null_labels(labels.shape[0]), labels)


def edm_loss(net: FashionDenoiser, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Karras et al. (2022) loss: lambda(sigma) |D(x0 + sigma eps) - x0|^2, i.e. the raw network's target MSE."""
    sigma = sample_training_sigmas(images.shape[0], generator)
    noisy = images + sigma.reshape(-1, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    labels = _dropped_labels(net, labels, generator)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_scalings(sigma, SIGMA_DATA))
    target = (images - c_skip * noisy) / c_out
    return F.mse_loss(net.raw(c_in * noisy, c_noise.reshape(-1), labels).float(), target)


def flow_loss(net: FashionDenoiser, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Rectified-flow loss |v(x_t, 1000 sigma) - (eps - x0)|^2 for x_t = (1 - sigma) x0 + sigma eps.

    Times are SD3's logit-normal density (plus a uniform share, for the ends) mapped through the sampling shift,
    so training sigmas fall where the shift-3 schedule takes its steps.
    """
    count = images.shape[0]
    logit_normal = torch.randn(count, generator=generator).sigmoid()
    uniform = torch.rand(count, generator=generator)
    use_uniform = torch.rand(count, generator=generator) < FLOW_UNIFORM_SHARE
    sigma = flow_sigma(torch.where(use_uniform, uniform, logit_normal))
    noise = torch.randn(images.shape, generator=generator)
    column = sigma.reshape(-1, 1, 1, 1)
    noisy = (1 - column) * images + column * noise
    velocity = net.raw(noisy, timestep_feature(1000 * sigma), _dropped_labels(net, labels, generator))
    return F.mse_loss(velocity.float(), noise - images)


def _discrete_noising(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SD1.x's training noise: uniform discrete timesteps t, x_t = alpha x0 + s eps with alpha = 1 / sqrt(1 +
    sigma_t^2), s = sigma_t alpha. Returns t, sigma_t and alpha (as columns), eps and x_t."""
    timestep = torch.randint(len(VP_SCHEDULE.sigmas), (images.shape[0],), generator=generator)
    sigma = VP_SCHEDULE.sigmas[timestep].float().reshape(-1, 1, 1, 1)
    alpha = (sigma**2 + 1).rsqrt()
    noise = torch.randn(images.shape, generator=generator)
    return timestep, sigma, alpha, noise, alpha * images + sigma * alpha * noise


def v_loss(net: FashionDenoiser, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """V-prediction loss (Salimans & Ho, 2022) on the discrete VP schedule: target v = alpha eps - s x0."""
    timestep, sigma, alpha, noise, noisy = _discrete_noising(images, generator)
    velocity = net.raw(noisy, timestep_feature(timestep.float()), _dropped_labels(net, labels, generator))
    return F.mse_loss(velocity.float(), alpha * noise - sigma * alpha * images)


def eps_loss(net: FashionDenoiser, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Epsilon-prediction loss (Ho et al., 2020) on the discrete VP schedule, as SD1.x was trained: target eps."""
    timestep, _, _, noise, noisy = _discrete_noising(images, generator)
    prediction = net.raw(noisy, timestep_feature(timestep.float()), _dropped_labels(net, labels, generator))
    return F.mse_loss(prediction.float(), noise)


DENOISER_LOSSES = {"edm": edm_loss, "flow": flow_loss, "v": v_loss, "eps": eps_loss}


def classifier_loss(net: FashionClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Cross-entropy on images shifted by up to 2 pixels, so the classifier tolerates off-centre samples."""
    shifts = torch.randint(-2, 3, (2,), generator=generator).tolist()
    shifted = torch.roll(F.pad(images, (2, 2, 2, 2), value=-1.0), shifts, dims=(2, 3))[:, :, 2:-2, 2:-2]
    return F.cross_entropy(net(shifted), labels)


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), net.parameters(), strict=True):
        ema_param.lerp_(param, 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), net.buffers(), strict=True):
        ema_buffer.copy_(buffer)


def save_weights(module: nn.Module, path: Path, metadata: dict[str, object]) -> None:
    """fp16 floating tensors (integer buffers as they are), written whole or not at all."""
    state = {
        name: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
        for name, tensor in module.state_dict().items()
    }
    write_safetensors(path, state, {key: str(value) for key, value in metadata.items()})


@torch.no_grad()
def test_accuracy(net: FashionClassifier, images: Tensor, labels: Tensor) -> float:
    net.eval()
    predictions = torch.cat([net(batch).argmax(1) for batch in images.split(1000)])
    return (predictions == labels).float().mean().item()


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_fashion_mnist("train")
    denoiser = args.what != "classifier"
    if denoiser:
        net: nn.Module = build_denoiser(args.what, args.parameterisation, args.latent)
        loss_fn, lr, batch_size = DENOISER_LOSSES[args.parameterisation], args.lr or 6e-4, args.batch_size or 64
        ema_decay = 0.999
        if args.latent:
            images = encode_latent(images)
    else:
        net = FashionClassifier()
        loss_fn, lr, batch_size, ema_decay = classifier_loss, args.lr or 2e-3, args.batch_size or 128, 0.99
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    metadata: dict[str, object] = {
        "model": args.what,
        **(denoiser_description(args.what, args.parameterisation, args.latent) if denoiser else {}),
        "seed": args.seed,
        "params": count_parameters(net),
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "precision": args.precision,
        "threads": args.threads,
    }
    start = last_checkpoint = time.monotonic()
    order = torch.randperm(len(images), generator=generator)
    cursor, running_loss, step = 0, None, 0
    max_steps = args.steps if args.steps is not None else (3000 if args.what == "classifier" else None)
    progress = tqdm(total=max_steps, desc=f"train {args.what}", mininterval=10)
    while (max_steps is None or step < max_steps) and time.monotonic() - start < 60 * args.minutes:
        if cursor + batch_size > len(images):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        net.train()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / args.warmup)
        with autocast:
            loss = loss_fn(net, images[batch], labels[batch], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        step += 1
        # Short runs would keep the random initialisation in a fixed-decay EMA; ramp the decay up first.
        update_ema(ema, net, min(ema_decay, (1 + step) / (10 + step)))
        running_loss = loss.item() if running_loss is None else 0.99 * running_loss + 0.01 * loss.item()
        progress.update()
        progress.set_postfix(loss=f"{running_loss:.4f}", refresh=False)
        if time.monotonic() - last_checkpoint > 60 * args.checkpoint_minutes:
            elapsed = (time.monotonic() - start) / 60
            save_weights(ema, args.out, {**metadata, "steps": step, "minutes": f"{elapsed:.1f}", "loss": running_loss})
            last_checkpoint = time.monotonic()
    progress.close()
    metadata.update(steps=step, minutes=f"{(time.monotonic() - start) / 60:.1f}", loss=f"{running_loss:.5f}")
    if args.what == "classifier":
        test_images, test_labels = load_fashion_mnist("test")
        metadata["test_accuracy"] = f"{test_accuracy(ema, test_images, test_labels):.4f}"
    save_weights(ema, args.out, metadata)
    print(json.dumps(metadata))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=[*ARCHITECTURES, "classifier"])
    parser.add_argument(
        "--parameterisation",
        choices=PARAMETERISATIONS,
        default="edm",
        help="denoisers only: edm (ComfyUI EPS, EDM-preconditioned), flow (CONST, shift 3), v (V_PREDICTION) or eps "
        "(EPS on SD1.x's discrete schedule)",
    )
    parser.add_argument(
        "--latent",
        action="store_true",
        help=f"denoisers only: train on the fixed 4x14x14 latent ({', '.join(LATENT_ONLY)} need it)",
    )
    parser.add_argument("--out", type=Path, help="output .safetensors (fp16 EMA weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=75.0, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="step budget (default: classifier 3000)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: denoisers 64, classifier 128")
    parser.add_argument("--lr", type=float, default=None, help="Adam lr (default: denoisers 6e-4, classifier 2e-3)")
    parser.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype for training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error(f"{args.what} needs --out PATH.safetensors")
    if args.what in LATENT_ONLY and not args.latent:
        parser.error(f"the {args.what} works on the 4x14x14 latent only: add --latent")
    train(args)


if __name__ == "__main__":
    main()
