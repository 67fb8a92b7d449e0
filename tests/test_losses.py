"""training/losses.py: every loss by name against a hand computation on a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import make_config
from training.losses import LOSSES, build_loss, inverse_frequency_weights

LOGITS = torch.tensor([[2.0, 0.5, -1.0],
                       [0.1, 0.2, 0.3],
                       [-0.5, 1.5, 0.0],
                       [1.0, 1.0, 1.0]])
TARGET = torch.tensor([0, 2, 1, 0])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])  # training labels: counts 4, 2, 6


def _p(row: int) -> list[float]:
    """softmax of one row, by hand"""
    e = [math.exp(v) for v in LOGITS[row].tolist()]
    return [v / sum(e) for v in e]


def _nll(row: int, k: int) -> float:
    return -math.log(_p(row)[k])


def _loss(**cfg) -> torch.nn.Module:
    # the hand computations are of the unsmoothed losses; presets may smooth, so say 0 unless a test sets it
    cfg.setdefault("label_smoothing", 0.0)
    return build_loss(make_config(**cfg), LABELS, 3)


def test_cross_entropy_by_hand():
    expected = sum(_nll(i, int(TARGET[i])) for i in range(4)) / 4
    assert float(_loss(loss="cross_entropy")(LOGITS, TARGET)) == pytest.approx(expected, rel=1e-6)


def test_nll_on_log_softmax_equals_cross_entropy():
    assert float(_loss(loss="nll")(LOGITS, TARGET)) == pytest.approx(float(_loss(loss="cross_entropy")(LOGITS, TARGET)),
                                                                     rel=1e-6)


def test_inverse_frequency_weights():
    # w_k = N / (K n_k) = 12 / (3 * [4, 2, 6])
    assert inverse_frequency_weights(LABELS, 3).tolist() == pytest.approx([1.0, 2.0, 2 / 3])
    assert inverse_frequency_weights(torch.tensor([0, 1, 2, 0, 1, 2]), 3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"classes \[2\] have no training examples"):
        inverse_frequency_weights(torch.tensor([0, 1]), 3)


def test_weighted_cross_entropy_with_inverse_frequency_weights_by_hand():
    w = [1.0, 2.0, 2 / 3]
    num = sum(w[int(TARGET[i])] * _nll(i, int(TARGET[i])) for i in range(4))
    den = sum(w[int(t)] for t in TARGET)
    assert float(_loss(loss="weighted_cross_entropy")(LOGITS, TARGET)) == pytest.approx(num / den, rel=1e-6)


def test_weighted_cross_entropy_with_given_weights():
    w = [0.5, 1.0, 3.0]
    num = sum(w[int(TARGET[i])] * _nll(i, int(TARGET[i])) for i in range(4))
    den = sum(w[int(t)] for t in TARGET)
    got = _loss(loss="weighted_cross_entropy", class_weights=tuple(w))(LOGITS, TARGET)
    assert float(got) == pytest.approx(num / den, rel=1e-6)
    with pytest.raises(ValueError, match="class_weights has 2 values; the dataset has 3"):
        _loss(loss="weighted_cross_entropy", class_weights=(1.0, 2.0))


def test_focal_with_gamma_zero_equals_cross_entropy():
    ce = float(_loss(loss="cross_entropy")(LOGITS, TARGET))
    assert float(_loss(loss="focal", focal_gamma=0.0)(LOGITS, TARGET)) == pytest.approx(ce, rel=1e-6)


def test_focal_with_gamma_two_by_hand_and_alpha():
    terms = [(1 - _p(i)[int(TARGET[i])]) ** 2 * _nll(i, int(TARGET[i])) for i in range(4)]
    assert float(_loss(loss="focal", focal_gamma=2.0)(LOGITS, TARGET)) == pytest.approx(sum(terms) / 4, rel=1e-6)
    alpha = [0.25, 0.5, 1.0]
    weighted = sum(alpha[int(TARGET[i])] * terms[i] for i in range(4)) / 4
    got = _loss(loss="focal", focal_gamma=2.0, focal_alpha=tuple(alpha))(LOGITS, TARGET)
    assert float(got) == pytest.approx(weighted, rel=1e-6)
    # easy examples count less than under cross-entropy
    assert sum(terms) / 4 < float(_loss(loss="cross_entropy")(LOGITS, TARGET))
    with pytest.raises(ValueError, match="focal_alpha has 1 values"):
        _loss(loss="focal", focal_alpha=(1.0,))


def test_mse_on_one_hot_by_hand():
    sq = [(_p(i)[k] - (1.0 if k == int(TARGET[i]) else 0.0)) ** 2 for i in range(4) for k in range(3)]
    assert float(_loss(loss="mse")(LOGITS, TARGET)) == pytest.approx(sum(sq) / 12, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_by_hand(eps):
    # target distribution (1 - eps) one-hot + eps / K everywhere
    expected = sum((1 - eps) * _nll(i, int(TARGET[i])) + eps * sum(_nll(i, k) for k in range(3)) / 3
                   for i in range(4)) / 4
    assert float(_loss(loss="cross_entropy", label_smoothing=eps)(LOGITS, TARGET)) == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="label_smoothing applies to cross_entropy"):
        _loss(loss="focal", label_smoothing=0.1)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; known losses: " + ", ".join(LOSSES)):
        _loss(loss="hinge")
    assert set(LOSSES) == {"cross_entropy", "weighted_cross_entropy", "nll", "focal", "mse"}


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_has_gradients_that_lower_it(name):
    logits = LOGITS.clone().requires_grad_(True)
    crit = _loss(loss=name)
    before = crit(logits, TARGET)
    before.backward()
    with torch.no_grad():
        after = crit(logits - 0.5 * logits.grad, TARGET)
    assert float(after) < float(before.detach())
