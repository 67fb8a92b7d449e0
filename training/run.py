"""What a training run is made of: its data on the device (Batches), everything built from the config
(Run, made by training.pipeline.prepare) and the state of fit() between epochs (FitState).

Plain dataclasses: the loop (training.engine), the checkpoints (training.checkpoint) and the
orchestration (training.pipeline) pass them around; none of them holds behaviour of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from core.models import normalise
from training.data import Dataset


@dataclass
class Batches:
    """Images and labels kept as tensors on the training device, with the normalisation to apply."""
    x: torch.Tensor     # (N, C, H, W) uint8
    y: torch.Tensor     # (N,) int64
    mean: torch.Tensor  # (1, C, 1, 1) on the 0..1 scale
    std: torch.Tensor

    def normalise(self, xf: torch.Tensor) -> torch.Tensor:
        return normalise(xf, self.mean, self.std)

    def __len__(self):
        return self.y.numel()


@dataclass
class Run:
    """Everything one run trains and evaluates with, built from the config alone."""
    dataset: Dataset
    device: torch.device
    train: Batches
    val: Batches                   # may be empty (val_fraction=0): fit() then skips validation
    test: Batches
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # steps once per batch
    generator: torch.Generator     # the data order and augmentation draws
    input_spec: dict               # what the service needs to preprocess images like training did

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)


@dataclass
class FitState:
    epoch: int = 0                  # epochs completed
    history: list = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    best_state: dict | None = None  # weights of the best epoch (early stopping keeps them)
