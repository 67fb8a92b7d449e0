"""Classification metrics, all derived from one confusion matrix (rows: true, cols: predicted).

Pure functions on tensors or lists; used by the training report and by the service's /evaluate,
so the offline and online numbers are computed by the same code.
"""

from __future__ import annotations

import math

import torch


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; one bincount, as in torchvision's references."""
    labels = labels.reshape(-1).long()
    preds = preds.reshape(-1).long()
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(cm: torch.Tensor) -> float:
    n = int(cm.sum())
    return float(cm.trace()) / n if n else 0.0


def per_class(cm: torch.Tensor, class_names: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class. An undefined ratio (0/0) is reported as 0.0."""
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)  # true instances of each class
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return [
        {
            "label": k,
            "class_name": class_names[k],
            "precision": round(float(precision[k]), 6),
            "recall": round(float(recall[k]), 6),
            "f1": round(float(f1[k]), 6),
            "support": int(support[k]),
        }
        for k in range(len(class_names))
    ]


def calibration(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Expected calibration error over equal-width confidence bins, with the bins for a reliability diagram."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    conf = conf.double()
    # bin i holds confidences in (i/n, (i+1)/n]; confidence 0 cannot occur for a softmax over >= 1 class
    idx = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    count = torch.bincount(idx, minlength=n_bins).double()
    sum_conf = torch.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = torch.bincount(idx, weights=correct, minlength=n_bins)
    n = max(int(labels.numel()), 1)
    ece = float(((sum_conf - sum_acc).abs()).sum()) / n
    bins = [
        {
            "lower": i / n_bins,
            "upper": (i + 1) / n_bins,
            "count": int(count[i]),
            "confidence": float(sum_conf[i] / count[i]) if count[i] else None,
            "accuracy": float(sum_acc[i] / count[i]) if count[i] else None,
        }
        for i in range(n_bins)
    ]
    return {"ece": round(ece, 6), "n_bins": n_bins, "bins": bins}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sensible at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_test(correct_a: int, n_a: int, correct_b: int, n_b: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test that both accuracies are equal."""
    if n_a == 0 or n_b == 0:
        return 1.0
    pooled = (correct_a + correct_b) / (n_a + n_b)
    var = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    if var == 0:
        return 1.0 if correct_a / n_a == correct_b / n_b else 0.0
    z = (correct_a / n_a - correct_b / n_b) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2))


def summarize(cm: torch.Tensor, class_names: list[str]) -> dict:
    """The numbers every report and answer carries, all from the same matrix."""
    return {
        "n": int(cm.sum()),
        "accuracy": accuracy(cm),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class(cm, class_names),
    }


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value for paired classifiers on the same images.

    `a_only`: images A got right and B wrong; `b_only`: the reverse (the discordant pairs; images
    both got right or both wrong carry no evidence). Under the null hypothesis that both are equally
    accurate each discordant image is a fair coin, so the count a_only ~ Binomial(a_only + b_only, 1/2)
    and p = min(1, 2 * P[X <= min(a_only, b_only)]). No discordant pairs: p = 1.
    Exact integer arithmetic: the binomial sum over 2^n is one correctly rounded division.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_difference_interval(n: int, a_only: int, b_only: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval of accuracy(B) - accuracy(A) for paired predictions on the same n images.

    Agresti & Min (2005): the Wald interval of a difference of matched proportions after adding
    1/2 to each of the four cells of the 2x2 table (good coverage even with few discordant pairs).
    Centre (b_only - a_only) / (n + 2); variance ((a+b) - (b-a)^2 / n') / n'^2 with n' = n + 2.
    """
    if n <= 0:
        return (-1.0, 1.0)
    a, b, m = a_only + 0.5, b_only + 0.5, n + 2
    centre = (b - a) / m
    half = z * math.sqrt(max((a + b) - (b - a) ** 2 / m, 0.0)) / m
    return (max(-1.0, centre - half), min(1.0, centre + half))


def paired_comparison(correct_a, correct_b, alpha: float = 0.05) -> dict:
    """The paired figures of classifiers A and B on the same n images, from each one's per-image correctness.

    `correct_a`, `correct_b`: (n,) booleans (a tensor, array or list), element i telling whether A (B) got
    image i right. The one place this arithmetic lives: the registry's compare (offline, the stored test
    predictions) and the service's paired /evaluate (live, one batch) both call it. Returns n, each one's
    correct count, the discordant counts (a_right_b_wrong, a_wrong_b_right), the exact McNemar p-value,
    diff = accuracy(B) - accuracy(A) with its paired 95% interval, and the verdict at `alpha`:
    "B better" or "A better" when p < alpha, else "no significant difference".
    """
    right_a = torch.as_tensor(correct_a, dtype=torch.bool).reshape(-1)
    right_b = torch.as_tensor(correct_b, dtype=torch.bool).reshape(-1)
    if right_a.shape != right_b.shape:
        raise ValueError(f"paired figures need the same images: {right_a.numel()} vs {right_b.numel()} results")
    n = int(right_a.numel())
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    a_correct, b_correct = int(right_a.sum()), int(right_b.sum())
    p = mcnemar_exact(a_only, b_only)
    verdict = "no significant difference" if p >= alpha else ("B better" if b_correct > a_correct else "A better")
    return {"n": n, "a_correct": a_correct, "b_correct": b_correct, "a_right_b_wrong": a_only,
            "a_wrong_b_right": b_only, "mcnemar_p": p, "diff": (b_correct - a_correct) / n if n else 0.0,
            "diff_ci95": paired_difference_interval(n, a_only, b_only), "verdict": verdict}
