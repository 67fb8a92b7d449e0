"""The fit verdict in every manifest: underfitting, overfitting or a good fit, read off the history."""

from __future__ import annotations


def fit_verdict(history: list[dict], underfit_accuracy: float, overfit_gap: float) -> dict:
    """Underfitting: train and validation both poor. Overfitting: train good, validation clearly
    worse (or validation loss rising from its minimum while training loss falls). Else a good fit."""
    last = history[-1]
    tr, va = last["train_accuracy"], last.get("val_accuracy")
    numbers = {"train_accuracy": round(tr, 4), "val_accuracy": None if va is None else round(va, 4),
               "underfit_accuracy": underfit_accuracy, "overfit_gap": overfit_gap}
    if va is None:
        return {"verdict": "unknown", "reason": "no validation split (val_fraction=0)", **numbers}
    gap = tr - va
    numbers["gap"] = round(gap, 4)
    val_losses = [h["val_loss"] for h in history]
    best = min(range(len(val_losses)), key=val_losses.__getitem__)
    rising = len(history) - 1 - best >= 2 and val_losses[-1] > val_losses[best] * 1.05
    if tr < underfit_accuracy and va < underfit_accuracy:
        return {"verdict": "underfitting", "reason": f"train {tr:.4f} and validation {va:.4f} accuracy are both "
                f"below {underfit_accuracy}: more capacity, epochs or learning rate", **numbers}
    if gap > overfit_gap or rising:
        why = (f"train accuracy {tr:.4f} exceeds validation {va:.4f} by {gap:.4f} > {overfit_gap}" if gap > overfit_gap
               else f"validation loss rose from {val_losses[best]:.4f} (epoch {best + 1}) to {val_losses[-1]:.4f}")
        return {"verdict": "overfitting", "reason": why + ": more data or augmentation, regularisation, early stopping",
                **numbers}
    return {"verdict": "good_fit", "reason": f"train {tr:.4f} and validation {va:.4f} accuracy are close "
            f"(gap {gap:.4f} <= {overfit_gap})", **numbers}
