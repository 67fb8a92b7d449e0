"""Loss functions by name. Each takes raw logits (B, K) and integer labels (B,).

The seed's lesson, kept visible: CrossEntropyLoss == log_softmax + NLLLoss; weighting by inverse
class frequency counters imbalance; focal loss down-weights easy examples by (1 - p_t)^gamma and
equals cross-entropy at gamma = 0; MSE compares probabilities with one-hot targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.config import SMOOTHABLE


class NLLOnLogSoftmax(nn.Module):
    def forward(self, logits, target):
        return F.nll_loss(F.log_softmax(logits, dim=1), target)


class FocalLoss(nn.Module):
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t, averaged over the batch (Lin et al., 2017)."""

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def forward(self, logits, target):
        logp_t = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)  # (B,)
        loss = -((1 - logp_t.exp()) ** self.gamma) * logp_t
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


class MSEOnProbabilities(nn.Module):
    """Mean squared error between softmax probabilities and one-hot targets."""

    def forward(self, logits, target):
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        return F.mse_loss(logits.softmax(dim=1), onehot)


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """w_k = N / (K * n_k): 1.0 for every class when classes are balanced."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"classes {missing} have no training examples; give --class-weights explicitly")
    return labels.numel() / (num_classes * counts)


# Builders by name: (config, training labels (N,), number of classes) -> the loss module.
def _cross_entropy(cfg, train_labels: torch.Tensor, num_classes: int) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _weighted_cross_entropy(cfg, train_labels: torch.Tensor, num_classes: int) -> nn.Module:
    if cfg.class_weights is not None:
        if len(cfg.class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(cfg.class_weights)} values; "
                             f"the dataset has {num_classes} classes")
        weight = torch.tensor(cfg.class_weights, dtype=torch.float32)
    else:
        weight = inverse_frequency_weights(train_labels, num_classes)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def _focal(cfg, train_labels: torch.Tensor, num_classes: int) -> nn.Module:
    alpha = None
    if cfg.focal_alpha is not None:
        if len(cfg.focal_alpha) != num_classes:
            raise ValueError(f"focal_alpha has {len(cfg.focal_alpha)} values; the dataset has {num_classes} classes")
        alpha = torch.tensor(cfg.focal_alpha, dtype=torch.float32)
    return FocalLoss(cfg.focal_gamma, alpha)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "cross_entropy": _cross_entropy,
    "weighted_cross_entropy": _weighted_cross_entropy,
    "nll": lambda cfg, train_labels, num_classes: NLLOnLogSoftmax(),
    "focal": _focal,
    "mse": lambda cfg, train_labels, num_classes: MSEOnProbabilities(),
}


def build_loss(cfg, train_labels: torch.Tensor, num_classes: int) -> nn.Module:
    name = cfg.loss
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    if cfg.label_smoothing and name not in SMOOTHABLE:
        raise ValueError(f"label_smoothing applies to {' and '.join(SMOOTHABLE)}, not {name!r}")
    return LOSSES[name](cfg, train_labels, num_classes)
