"""Optimizers and learning-rate schedules by name. Schedules step once per batch."""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "rmsprop")
SCHEDULES = ("none", "step", "cosine", "onecycle")


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum or 0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")


def build_schedule(cfg, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(cfg.epochs * steps_per_epoch, 1)
    name = cfg.schedule
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "step":
        every = max(cfg.step_size * steps_per_epoch, 1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.gamma ** (step // every))
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    if name == "onecycle":
        # linear warm-up over the first 25% of steps to the peak lr, then linear decay to 0:
        # written as a LambdaLR so its whole state is one integer (resumable without pickle)
        warm = max(int(0.25 * total), 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: (step + 1) / warm if step < warm else max(0.0, (total - step) / max(total - warm, 1)))
    raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")
