"""core/metrics.py: every classification number comes from one confusion matrix, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from core.metrics import (
    accuracy,
    calibration,
    confusion_matrix,
    mcnemar_exact,
    paired_difference_interval,
    per_class,
    summarize,
    two_proportion_test,
    wilson_interval,
)

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 2])
PREDS = torch.tensor([0, 1, 1, 1, 2, 0, 2])


def test_confusion_matrix_rows_are_true_columns_predicted():
    cm = confusion_matrix(LABELS, PREDS, 3)
    assert cm.tolist() == [[1, 1, 0],
                           [0, 2, 0],
                           [1, 0, 2]]
    assert cm.dtype == torch.int64
    assert accuracy(cm) == pytest.approx(5 / 7)


def test_confusion_matrix_keeps_classes_that_never_occur():
    cm = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 4)
    assert cm.shape == (4, 4)
    assert cm.sum() == 2 and cm[0, 0] == 1 and cm[0, 1] == 1


def test_per_class_precision_recall_f1_support_by_hand():
    rows = per_class(confusion_matrix(LABELS, PREDS, 3), ["a", "b", "c"])
    by = {r["class_name"]: r for r in rows}
    # class a: tp 1, predicted 2, true 2
    assert (by["a"]["precision"], by["a"]["recall"], by["a"]["f1"], by["a"]["support"]) == (0.5, 0.5, 0.5, 2)
    # class b: tp 2, predicted 3, true 2 -> P 2/3, R 1, F1 0.8
    assert by["b"]["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert by["b"]["recall"] == 1.0 and by["b"]["f1"] == pytest.approx(0.8) and by["b"]["support"] == 2
    # class c: tp 2, predicted 2, true 3 -> P 1, R 2/3, F1 0.8
    assert by["c"]["precision"] == 1.0 and by["c"]["recall"] == pytest.approx(2 / 3, abs=1e-6)
    assert by["c"]["f1"] == pytest.approx(0.8) and by["c"]["support"] == 3
    assert [r["label"] for r in rows] == [0, 1, 2]


def test_per_class_undefined_ratios_are_zero_not_nan():
    cm = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), 2)
    r = per_class(cm, ["x", "y"])[1]  # class y: never true, never predicted
    assert (r["precision"], r["recall"], r["f1"], r["support"]) == (0.0, 0.0, 0.0, 0)


def test_summarize_numbers_all_agree_with_the_matrix():
    cm = confusion_matrix(LABELS, PREDS, 3)
    s = summarize(cm, ["a", "b", "c"])
    assert s["n"] == 7 and s["confusion_matrix"] == cm.tolist()
    assert s["accuracy"] == sum(cm[i][i] for i in range(3)) / 7
    assert sum(r["support"] for r in s["per_class"]) == s["n"]


def test_calibration_ece_on_a_known_case():
    # confidences 0.9 (one right, one wrong) and 0.7 (both right), away from bin edges
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    c = calibration(probs, labels, n_bins=15)
    # bin of 0.9: |2 * 0.9 - 1 correct| = 0.8; bin of 0.7: |2 * 0.7 - 2| = 0.6; ECE = 1.4 / 4
    assert c["ece"] == pytest.approx(0.35, abs=1e-6)
    assert c["n_bins"] == 15 and len(c["bins"]) == 15
    filled = [b for b in c["bins"] if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in filled] == [(2, 1.0), (2, 0.5)]
    assert filled[0]["lower"] < 0.7 <= filled[0]["upper"] and filled[1]["lower"] < 0.9 <= filled[1]["upper"]
    assert filled[1]["confidence"] == pytest.approx(0.9)
    assert sum(b["count"] for b in c["bins"]) == 4
    assert all(b["accuracy"] is None for b in c["bins"] if not b["count"])


def test_calibration_perfect_when_confidence_matches_accuracy():
    # four samples at confidence 0.75, three right: accuracy equals confidence in the bin
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    c = calibration(probs, torch.tensor([0, 0, 0, 1]))
    assert c["ece"] == pytest.approx(0.0, abs=1e-9)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17  # 0.1611: never the degenerate (0, 0) of the normal approximation
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.83 < lo < 0.85
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(9000, 10000)
    assert lo < 0.9 < hi and hi - lo < 0.012


def test_two_proportion_test_known_value_and_symmetry():
    # 45/100 vs 60/100: pooled 0.525, z = 0.15 / sqrt(0.525 * 0.475 * 0.02) = 2.124, two-sided p = 0.0337
    p = two_proportion_test(45, 100, 60, 100)
    assert p == pytest.approx(0.0337, abs=2e-4)
    assert two_proportion_test(60, 100, 45, 100) == pytest.approx(p)
    assert two_proportion_test(50, 100, 500, 1000) == pytest.approx(1.0)
    assert two_proportion_test(10, 10, 0, 10) < 1e-4
    assert two_proportion_test(10, 10, 10, 10) == 1.0
    assert two_proportion_test(0, 0, 5, 10) == 1.0
    assert math.isfinite(two_proportion_test(0, 10, 0, 10))


@pytest.mark.parametrize("a_only, b_only, p", [
    (1, 9, 22 / 1024),      # 2 * (C(10,0) + C(10,1)) / 2^10 = 0.021484375
    (9, 1, 22 / 1024),      # two-sided: symmetric in A and B
    (2, 8, 112 / 1024),     # 2 * (1 + 10 + 45) / 1024 = 0.109375
    (0, 5, 2 / 32),         # 0.0625: five discordant pairs can never reach p < 0.05
    (0, 6, 2 / 64),         # 0.03125: six can
    (5, 5, 1.0), (0, 1, 1.0), (0, 0, 1.0),  # no evidence either way; none at all is p = 1
    # larger counts, checked against mpmath's exact binomial sum (50-digit arithmetic)
    (120, 453, 1.8363793799056088e-46),
    (500, 600, 0.0028195449914364275),
    (4500, 4600, 0.2993619106568025),
])
def test_mcnemar_exact_known_values(a_only, b_only, p):
    assert mcnemar_exact(a_only, b_only) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_refuses_negative_counts():
    with pytest.raises(ValueError, match="discordant counts"):
        mcnemar_exact(-1, 3)


def test_paired_difference_interval_by_hand():
    # Agresti-Min: cells +1/2 -> a 10.5, b 20.5, n' 102; centre 10/102, half 1.959964*sqrt(31 - 100/102)/102
    lo, hi = paired_difference_interval(100, 10, 20)
    assert (lo, hi) == (pytest.approx(-0.0072419, abs=1e-6), pytest.approx(0.2033203, abs=1e-6))
    assert paired_difference_interval(100, 20, 10) == (pytest.approx(-hi), pytest.approx(-lo))
    lo, hi = paired_difference_interval(10000, 0, 0)  # identical predictions: a narrow interval around 0
    assert lo < 0 < hi and hi - lo < 5e-4
    lo, hi = paired_difference_interval(10000, 120, 453)  # diff 0.0333: clearly above 0
    assert 0.028 < lo < 0.0333 < hi < 0.038
