"""training/verdict.py: underfitting, overfitting or a good fit, read off the per-epoch history."""

from __future__ import annotations

from training.verdict import fit_verdict


def _hist(tr_acc, va_acc, val_losses):
    return [{"epoch": i + 1, "train_loss": 0.5, "train_accuracy": tr_acc, "val_loss": v, "val_accuracy": va_acc}
            for i, v in enumerate(val_losses)]


def test_fit_verdict_underfitting():
    v = fit_verdict(_hist(0.62, 0.60, [1.2, 1.1, 1.0]), 0.80, 0.03)
    assert v["verdict"] == "underfitting"
    assert (v["train_accuracy"], v["val_accuracy"], v["gap"], v["underfit_accuracy"]) == (0.62, 0.6, 0.02, 0.8)
    assert "0.6200" in v["reason"] and "0.6000" in v["reason"] and "0.8" in v["reason"]


def test_fit_verdict_overfitting_by_gap():
    v = fit_verdict(_hist(0.99, 0.90, [0.4, 0.35, 0.33]), 0.80, 0.03)
    assert v["verdict"] == "overfitting" and v["gap"] == 0.09 and v["overfit_gap"] == 0.03
    assert "0.9900" in v["reason"] and "0.9000" in v["reason"] and "0.0900 > 0.03" in v["reason"]


def test_fit_verdict_overfitting_by_rising_validation_loss():
    v = fit_verdict(_hist(0.91, 0.90, [0.5, 0.30, 0.35, 0.40]), 0.80, 0.03)
    assert v["verdict"] == "overfitting"
    assert "validation loss rose from 0.3000 (epoch 2) to 0.4000" in v["reason"]


def test_fit_verdict_good_fit():
    v = fit_verdict(_hist(0.92, 0.91, [0.5, 0.4, 0.3]), 0.80, 0.03)
    assert v["verdict"] == "good_fit" and v["gap"] == 0.01
    assert "0.9200" in v["reason"] and "0.9100" in v["reason"]


def test_fit_verdict_without_validation_is_unknown():
    h = [{"epoch": 1, "train_loss": 0.3, "train_accuracy": 0.9}]
    assert fit_verdict(h, 0.8, 0.03)["verdict"] == "unknown"
