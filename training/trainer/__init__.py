"""The trainer's pipeline as plain functions: references -> roll out -> score -> update -> export.

- ``cli``: the command line (``python -m consistency_solver.training``).
- ``rollout``: the solver unrolled with per-sample weights (sampled actions for PPO, the policy's
  differentiable expectation for the direct mode).
- ``ppo``: the paper's clipped policy-gradient update with its released code's bugs fixed.
- ``direct``: the fast mode, a gradient through the unrolled solver.
- ``table``, ``schedule``: free weight tables and learned sigma schedules (direct mode).
- ``rewards``: latent RMSE/PSNR, image-space PSNR/SSIM after a VAE decode, feature-model rewards.
- ``data``: training and held-out reference sets for the built-in beds.
- ``comfy_model``: a ComfyUI checkpoint behind the test-bed interface, to train on a real model.
- ``loop``: the training loop, checkpoints and held-out evaluation.
- ``report``: the JSON + PNG report.
- ``distributed``: torchrun data parallelism (gloo or nccl).
- ``leave_one_out``: the defaults' protocol: trained without each learned bed and judged on it, then on all beds.
"""
