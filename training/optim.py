"""Optimizers and learning-rate schedules by name: plain dicts of builders, like core.models.MODELS.

Every schedule is a LambdaLR stepped once per batch: its builder returns the factor on the peak
learning rate as a function of the step, so a schedule's whole state is one integer (resumable
without pickle).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# (config, parameters) -> the optimizer
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda cfg, params: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
    "nesterov": lambda cfg, params: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum or 0.9, nesterov=True,
                                                    weight_decay=cfg.weight_decay),
    "adam": lambda cfg, params: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "adamw": lambda cfg, params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "rmsprop": lambda cfg, params: torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum,
                                                       weight_decay=cfg.weight_decay),
}


def _constant(cfg, steps_per_epoch: int, total: int) -> Callable[[int], float]:
    return lambda step: 1.0


def _step(cfg, steps_per_epoch: int, total: int) -> Callable[[int], float]:
    every = max(cfg.step_size * steps_per_epoch, 1)  # steps between decays
    return lambda step: cfg.gamma ** (step // every)


def _cosine(cfg, steps_per_epoch: int, total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _onecycle(cfg, steps_per_epoch: int, total: int) -> Callable[[int], float]:
    # linear warm-up over the first 25% of steps to the peak lr, then linear decay to 0
    warm = max(int(0.25 * total), 1)
    return lambda step: (step + 1) / warm if step < warm else max(0.0, (total - step) / max(total - warm, 1))


# (config, steps per epoch, total steps) -> the lr factor of each step
SCHEDULES: dict[str, Callable[..., Callable[[int], float]]] = {
    "none": _constant, "step": _step, "cosine": _cosine, "onecycle": _onecycle,
}


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known optimizers: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.optimizer](cfg, params)


def build_schedule(cfg, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; known schedules: {', '.join(SCHEDULES)}")
    total = max(cfg.epochs * steps_per_epoch, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[cfg.schedule](cfg, steps_per_epoch, total))
