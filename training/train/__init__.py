"""The trainer's pipeline as plain functions: references -> roll out -> score -> update -> export.

- ``rollout``: the solver unrolled with per-sample weights (sampled actions for PPO, the policy's
  differentiable expectation for the direct mode).
- ``ppo``: the paper's clipped policy-gradient update with its released code's bugs fixed.
- ``direct``: the fast mode, a gradient through the unrolled solver.
- ``rewards``: latent RMSE/PSNR, image-space PSNR/SSIM after a VAE decode, feature-model rewards.
- ``data``: training and held-out reference sets for the built-in beds.
- ``loop``: the training loop, checkpoints and held-out evaluation.
- ``report``: the JSON + PNG report.
- ``distributed``: torchrun data parallelism (gloo or nccl).
"""
