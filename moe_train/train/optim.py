"""AdamW with decay only on matrices, and the learning-rate schedules (warmup, then cosine, linear
or warmup-stable-decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_train.config import OptimConfig


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Weight decay on weight matrices only: never on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "tok_embeddings" in name else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, config),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device.type == "cuda",
    )


def lr_at(step: int, config: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): a linear warmup to config.lr, then
    config.schedule down to lr * min_lr_ratio, which it reaches at step max_steps. wsd holds lr
    until its decay starts, at max_steps - decay_fraction * max_steps (never inside the warmup)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_start = config.warmup_steps
    if config.schedule == "wsd":
        decay_start = max(decay_start, max_steps - round(config.decay_fraction * max_steps))
    progress = min(1.0, max(0, step - decay_start) / max(1, max_steps - decay_start))
    if config.schedule == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear, and wsd's decay
        remaining = 1.0 - progress
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * remaining)
