"""Paired evaluation: the champion and the challenger on the same labelled batch, free of BentoML.

/evaluate (JSON field `compare`) and /evaluate_npz (form field `compare`) answer the champion's usual
evaluation, the challenger's beside it, and a `comparison` block: the paired figures of
core.metrics.paired_comparison (the arithmetic of `python -m training compare`), with A the champion
and B the challenger, so on the same images the two answers agree figure for figure.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from core import metrics
from core.registry import ALPHA, CHALLENGER
from service import rollout
from service.inference import Classifier, InputError

NO_CHALLENGER = (f"compare needs a challenger beside the champion and none is loaded: set CHALLENGER to an alias "
                 f"or a version, or point the {CHALLENGER!r} alias at a version (python -m training promote NAME "
                 f"VERSION --alias {CHALLENGER})")


def parse_compare(value, form: bool = False) -> bool:
    """`compare` as sent: a JSON boolean; a form field "true", "false", "1" or "0" (BentoML hands a form value
    over JSON-decoded when it can, so those arrive as True, False, 1 and 0). Anything else is refused."""
    if type(value) is bool:
        return value
    if form and type(value) is int and value in (0, 1):
        return bool(value)
    allowed = '"true", "false", "1" or "0"' if form else "true or false (a JSON boolean)"
    shown = repr(_form_text(value) if form else value)
    raise InputError(f"compare must be {allowed}, got {shown}", "compare")


def _form_text(value) -> str:
    """A form value as the client sent it, from what BentoML made of it (JSON-decoded when it could be)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value  # it was not JSON, so it arrived as sent
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def challenger_for(champion: Classifier, challenger: Classifier | None) -> Classifier:
    """The challenger to compare with, or an InputError (409) when there is none or it cannot be paired with the
    champion (rollout.compatible: another input shape or other classes; the message says which, naming both)."""
    if challenger is None:
        raise InputError(NO_CHALLENGER, "no_challenger", 409)
    if not rollout.compatible(challenger, champion):
        differs = []
        if challenger.spec.shape != champion.spec.shape:
            differs.append(f"input shape ({champion.spec.describe()} vs {challenger.spec.describe()})")
        if challenger.classes != champion.classes:
            differs.append(f"classes ({champion.classes} vs {challenger.classes})")
        raise InputError(f"champion {champion.version} and challenger {challenger.version} differ in "
                         f"{' and '.join(differs)}: their answers cannot be paired", "not_comparable", 409)
    return challenger


def _predicted(model: Classifier, images: np.ndarray, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(per-image correctness (N,) bool, the model's usual evaluation block) on the batch."""
    preds = model.probabilities(images).argmax(1)
    cm = metrics.confusion_matrix(labels, preds, len(model.classes))
    return preds == labels, model.evaluation_answer(cm)


def paired_evaluation(champion: Classifier, challenger: Classifier, images: np.ndarray, labels: np.ndarray) -> dict:
    """The champion's evaluation of (images, labels), with the challenger's under `challenger` and the paired
    figures (A = champion, B = challenger) under `comparison`. Both models see the very same array."""
    y = torch.from_numpy(labels)
    right_a, answer = _predicted(champion, images, y)
    right_b, other = _predicted(challenger, images, y)
    figures = metrics.paired_comparison(right_a, right_b, ALPHA)
    comparison = {"a": champion.version, "b": challenger.version, **figures,
                  "diff_ci95": list(figures["diff_ci95"]), "alpha": ALPHA}
    return {**answer, "challenger": other, "comparison": comparison}
