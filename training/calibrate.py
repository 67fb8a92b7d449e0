"""Temperature scaling (Guo et al., 2017): one scalar T, fitted on the validation split.

    served probabilities = softmax(logits / T)          (core.models.probabilities)

T minimises the mean negative log-likelihood of the validation labels. The test set is looked at
only after T is fixed, and only to measure: the ECE of the served (calibrated) probabilities and,
beside it, the ECE at T = 1. T > 0 rescales the logits, so the argmax and every accuracy figure
stay exactly as they were; only the confidences move.

With flip averaging (tta_flip) the logits are the averaged ones the service computes
(core.models.forward_logits), so the fitted T applies to what is served.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.manifest import Calibration
from core.metrics import calibration
from core.models import probabilities

# T is searched in [0.05, 20]: far wider than any useful temperature, and a bound for degenerate
# validation sets (all correct: the NLL keeps falling as T -> 0).
LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T), in float64. logits (N, K), labels (N,)."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, tol: float = 1e-6) -> float:
    """The T in [0.05, 20] of least NLL on (logits, labels): golden-section search on log T.

    The NLL is convex in 1/T, hence unimodal in log T, so the search finds the minimum without
    gradients, learning rates or random starts (about 35 evaluations of a (N, K) softmax).
    """
    if labels.numel() == 0:
        return 1.0
    z, y = logits.detach().double().cpu(), labels.long().cpu()

    def f(u: float) -> float:  # NLL at T = exp(u)
        return float(F.cross_entropy(z * math.exp(-u), y))

    g = (math.sqrt(5) - 1) / 2
    a, b = LOG_T_RANGE
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return round(math.exp((a + b) / 2), 6)


def calibration_block(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor,
                      test_labels: torch.Tensor, n_bins: int = 15) -> Calibration:
    """Fit T on the validation logits, then measure the test set's ECE with and without it.

    val_logits (N_val, K), test_logits (N_test, K): the logits the service would compute (with flip
    averaging where the model uses it). The test arguments never influence T.
    """
    n_val = val_labels.numel()
    if n_val == 0:
        t = 1.0
        how = "no validation split (val_fraction=0): temperature 1.0, the plain softmax is served uncalibrated"
    else:
        t = fit_temperature(val_logits, val_labels)
        edge = " (at the edge of the searched range 0.05..20)" if not 0.051 < t < 19.9 else ""
        how = (f"least NLL of softmax(logits/T) on the {n_val} validation images{edge}: "
               f"NLL {nll(val_logits, val_labels):.4f} at T=1, {nll(val_logits, val_labels, t):.4f} at T={t:.4f}; "
               "the test set was not used")
    calibrated = calibration(probabilities(test_logits, t), test_labels, n_bins)
    plain = calibration(probabilities(test_logits), test_labels, n_bins)
    return Calibration(ece=calibrated["ece"], n_bins=calibrated["n_bins"], bins=calibrated["bins"],
                       temperature=t, ece_uncalibrated=plain["ece"], fitted_on=how)
