"""Human-facing files of a version: learning curves, confusion matrix, reliability diagram, report.md."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from core.manifest import Calibration, Manifest

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    if "val_loss" in history[0]:
        ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
        ax2.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    for ax, title in ((ax1, "loss"), (ax2, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def confusion_picture(cm: list[list[int]], classes: list[str], path: Path) -> None:
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * k, 1 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    peak = max(max(r) for r in cm) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, cm[i][j], ha="center", va="center", fontsize=7,
                    color="white" if cm[i][j] > peak / 2 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def reliability_picture(calibration: Calibration, path: Path) -> None:
    """Accuracy against confidence of the served (temperature-scaled) probabilities on the test set."""
    bins = [b for b in calibration.bins if b["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    width = 1 / calibration.n_bins
    ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    title = f"reliability at T = {calibration.temperature:.3f} (ECE {calibration.ece:.4f})"
    if calibration.ece_uncalibrated is not None:
        title += f"\nat T = 1: ECE {calibration.ece_uncalibrated:.4f}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(m: Manifest) -> str:
    rows = "\n".join(f"| {c['label']} | {c['class_name']} | {c['precision']:.4f} | {c['recall']:.4f} | "
                     f"{c['f1']:.4f} | {c['support']} |" for c in m.metrics.per_class)
    v, spec, ds, tr = m.training.verdict, m.model, m.dataset, m.training
    kwargs = " " + json.dumps(spec.kwargs) if spec.kwargs else ""
    tta = ", test-time flip averaging" if spec.tta_flip else ""
    how = (" (stopped early)" if tr.stopped_early else "") + (f", a replay of {tr.replay_of}" if tr.replay_of else "")
    ece = _calibration_line(m.metrics.calibration)
    return f"""# {m.name} {m.version}

- model: `{spec.arch}`{kwargs}, {spec.parameters:,} parameters{tta}
- dataset: {ds.name} ({ds.train} train / {ds.val} validation / {ds.test} test)
- **test accuracy {m.metrics.test_accuracy:.4f}** (loss {m.metrics.test_loss:.4f}), expected calibration error {ece}
- fit: **{v['verdict']}**: {v['reason']}
- trained {len(tr.history)} epoch(s) in {tr.training_seconds:.1f} s on {tr.device}{how}
- weights sha256 `{m.weights_sha256}`

| label | class | precision | recall | F1 | support |
|---|---|---|---|---|---|
{rows}

![learning curves](learning_curves.png) ![confusion matrix](confusion_matrix.png) ![reliability](reliability.png)
"""


def _calibration_line(c: Calibration) -> str:
    if c.ece_uncalibrated is None:  # a manifest from before temperature scaling
        return f"{c.ece:.4f}"
    return (f"{c.ece:.4f} at temperature {c.temperature:.4f}, {c.ece_uncalibrated:.4f} at 1.0 "
            f"(temperature: {c.fitted_on})")


def write_all(folder: Path, manifest: Manifest) -> None:
    learning_curves(manifest.training.history, folder / "learning_curves.png")
    confusion_picture(manifest.metrics.confusion_matrix, list(manifest.classes), folder / "confusion_matrix.png")
    reliability_picture(manifest.metrics.calibration, folder / "reliability.png")
    (folder / "report.md").write_text(markdown(manifest))
