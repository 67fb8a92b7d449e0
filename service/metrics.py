"""The project's Prometheus metrics, prefix `imgclf_`, next to BentoML's own `bentoml_service_*`.

Created inside the worker process (after `bentoml serve` has set PROMETHEUS_MULTIPROC_DIR), so
several workers write to the shared multiprocess directory and /metrics aggregates them. Each
gauge names how its per-worker values combine. Labels are low-cardinality: model version,
endpoint, class name, a fixed rejection reason; never a path or a request id.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


@dataclass
class Metrics:
    latency: Histogram
    batch_size: Histogram
    predictions: Counter
    evaluated: Counter
    evaluation_accuracy: Gauge
    offline_accuracy: Gauge
    model_info: Gauge
    rejected: Counter
    abandoned: Counter


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
            evaluation_accuracy=Gauge("imgclf_evaluation_accuracy", "Accuracy of the most recent /evaluate batch",
                                      ["model_version"], multiprocess_mode="mostrecent"),
            offline_accuracy=Gauge("imgclf_offline_test_accuracy", "Test accuracy recorded in the manifest",
                                   ["model_version"], multiprocess_mode="max"),
            model_info=Gauge("imgclf_model_info", "1 for the model version each live worker serves",
                             ["model_name", "model_version"], multiprocess_mode="livemax"),
            rejected=Counter("imgclf_rejected_requests", "Requests refused with a 4xx, by reason",
                             ["endpoint", "reason"]),
            abandoned=Counter("imgclf_abandoned_requests", "Requests whose client went away before the answer "
                              "(not computed, or dropped from the model's queue)", ["endpoint"]),
        )
    return _metrics
