"""The project's Prometheus metrics, prefix `imgclf_`, next to BentoML's own `bentoml_service_*`.

Every per-version series carries `model_version`, so two versions served side by side (a champion
and a challenger) keep separate series. The alert rules (deploy/prometheus/alerts.yml) compare live
traffic with the offline test set through the gauges `record_offline` sets at load.

Created inside the worker process (after `bentoml serve` has set PROMETHEUS_MULTIPROC_DIR), so
several workers write to the shared multiprocess directory and /metrics aggregates them. Each
gauge names how its per-worker values combine. Labels are low-cardinality: model version,
endpoint, class name, a fixed rejection reason; never a path or a request id.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from core.manifest import OfflineMetrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


@dataclass
class Metrics:
    latency: Histogram
    batch_size: Histogram
    predictions: Counter
    evaluated: Counter
    evaluated_correct: Counter
    evaluation_accuracy: Gauge
    offline_accuracy: Gauge
    offline_samples: Gauge
    expected_share: Gauge
    forward_batch_size: Histogram
    model_info: Gauge
    rejected: Counter
    abandoned: Counter
    shadow_agreement: Counter
    shadow_dropped: Counter


_metrics: Metrics | None = None


def get() -> Metrics:
    """The process's metrics, created on first use (one registration per process)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(
            latency=Histogram("imgclf_inference_latency_seconds", "Model inference time per request (validation "
                              "excluded)", ["endpoint", "model_version"], buckets=LATENCY_BUCKETS),
            batch_size=Histogram("imgclf_batch_size", "Images per request", ["endpoint"], buckets=BATCH_BUCKETS),
            predictions=Counter("imgclf_predictions", "Predictions answered, by predicted class",
                                ["model_version", "class_name"]),
            evaluated=Counter("imgclf_evaluated_samples", "Labelled images evaluated", ["model_version"]),
            evaluated_correct=Counter("imgclf_evaluated_correct", "Labelled images evaluated and classified "
                                      "correctly", ["model_version"]),
            evaluation_accuracy=Gauge("imgclf_evaluation_accuracy", "Accuracy of the most recent /evaluate batch",
                                      ["model_version"], multiprocess_mode="mostrecent"),
            offline_accuracy=Gauge("imgclf_offline_test_accuracy", "Test accuracy recorded in the manifest",
                                   ["model_version"], multiprocess_mode="max"),
            offline_samples=Gauge("imgclf_offline_test_samples", "Test images behind the manifest's accuracy",
                                  ["model_version"], multiprocess_mode="max"),
            expected_share=Gauge("imgclf_expected_prediction_share", "Share of each predicted class on the offline "
                                 "test set (confusion matrix column sum / n)", ["model_version", "class_name"],
                                 multiprocess_mode="max"),
            forward_batch_size=Histogram("imgclf_forward_batch_size", "Images in each forward pass of the /predict "
                                         "batcher", ["model_version"], buckets=BATCH_BUCKETS),
            model_info=Gauge("imgclf_model_info", "1 for the model version each live worker serves",
                             ["model_name", "model_version"], multiprocess_mode="livemax"),
            rejected=Counter("imgclf_rejected_requests", "Requests refused with a 4xx, by reason",
                             ["endpoint", "reason"]),
            abandoned=Counter("imgclf_abandoned_requests", "Requests whose client went away before the answer "
                              "(not computed, or dropped from the model's queue)", ["endpoint"]),
            shadow_agreement=Counter("imgclf_shadow_agreement", "Images the challenger classified in the shadow of "
                                     "the champion's answer, by whether their argmax classes agree",
                                     ["champion", "challenger", "agree"]),
            shadow_dropped=Counter("imgclf_shadow_dropped", "Images not shadowed: too many shadow passes were "
                                   "pending (service/rollout.py), or the challenger's pass failed"),
        )
    return _metrics


@functools.lru_cache(maxsize=4096)
def child(metric, *labels: str):
    """`metric.labels(*labels)`, remembered: the per-request series of the hot path (/predict) are a few, and
    prometheus_client checks and joins the label values again at every `labels` call (none is ever removed)."""
    return metric.labels(*labels)


def record_offline(version: str, classes: list[str], offline: OfflineMetrics) -> None:
    """At load: the offline figures the alerts compare with (test n, each class's predicted share), and
    every counter the alerts take increase() of, created at 0 (a series born at its first non-zero
    value would lose that first increase)."""
    m = get()
    n = offline.n
    m.offline_samples.labels(version).set(n)
    for j, name in enumerate(classes):
        m.expected_share.labels(version, name).set(sum(row[j] for row in offline.confusion_matrix) / n)
        m.predictions.labels(version, name)
    m.evaluated.labels(version)
    m.evaluated_correct.labels(version)


def record_pair(champion: str, challenger: str) -> None:
    """A champion and a challenger served together: their shadow agreement series, created at 0."""
    for agree in ("true", "false"):
        get().shadow_agreement.labels(champion, challenger, agree)


def correct_of(confusion_matrix: list[list[int]]) -> int:
    """Correctly classified images of an evaluation: the confusion matrix's trace."""
    return sum(row[i] for i, row in enumerate(confusion_matrix))
