"""The monitoring metrics on a real server's /metrics: the correct-answer counter that /evaluate and
/evaluate_npz feed, the offline figures set at load (test n, the expected share of each predicted class)
and the batcher's forward batch size. Reads differences between two scrapes: the session's server is
shared with other tests."""

from __future__ import annotations

import io
import re

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """(metric name, its label pairs) -> value, for every imgclf_ sample of /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r"^(imgclf_\w+)(?:\{([^}]*)\})? (\S+)$", text, re.M):
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def key(name: str, **labels) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def test_evaluations_count_correct_answers_and_load_sets_the_offline_mix(lenet_server, lenet_version, fashion):
    _, _, version, manifest = lenet_version
    classes, cm = manifest["classes"], manifest["confusion_matrix"]
    x, y = fashion.test_x[:, 0].numpy(), fashion.test_y.numpy()
    before = scrape(lenet_server)

    answer = httpx.post(lenet_server.url + "/evaluate", json={"images": x[:300].tolist(), "labels": y[:300].tolist()},
                        timeout=60).json()
    buf = io.BytesIO()
    np.savez(buf, images=x[300:500], labels=y[300:500])
    npz = httpx.post(lenet_server.url + "/evaluate_npz", files={"file": ("b.npz", buf.getvalue())}, timeout=60).json()
    assert httpx.post(lenet_server.url + "/predict", json={"images": x[:7].tolist()}, timeout=60).status_code == 200
    after = scrape(lenet_server)

    def delta(name, **labels):
        return after[key(name, **labels)] - before.get(key(name, **labels), 0.0)

    correct = [sum(row[i] for i, row in enumerate(a["confusion_matrix"])) for a in (answer, npz)]
    assert correct[0] == round(answer["accuracy"] * 300) and correct[1] == round(npz["accuracy"] * 200)
    assert delta("imgclf_evaluated_correct_total", model_version=version) == sum(correct)
    assert delta("imgclf_evaluated_samples_total", model_version=version) == 500
    # the forward pass of the /predict batcher: one pass of the 7 images
    assert delta("imgclf_forward_batch_size_count", model_version=version) == 1
    assert delta("imgclf_forward_batch_size_sum", model_version=version) == 7
    assert delta("imgclf_forward_batch_size_bucket", model_version=version, le="8.0") == 1
    assert delta("imgclf_forward_batch_size_bucket", model_version=version, le="4.0") == 0

    # set at load from the manifest: the offline test n and each class's share of the offline predictions
    n = sum(map(sum, cm))
    assert after[key("imgclf_offline_test_samples", model_version=version)] == n == 10_000
    shares = {k[1]: v for k, v in after.items() if k[0] == "imgclf_expected_prediction_share"}
    assert shares == {frozenset({("model_version", version), ("class_name", c)}):
                      pytest.approx(sum(row[j] for row in cm) / n) for j, c in enumerate(classes)}
    assert sum(shares.values()) == pytest.approx(1.0)
    # every class has a predictions series from the start (a counter born at its first non-zero value
    # would lose that first increase in the drift rule)
    predicted = {dict(k[1])["class_name"] for k in before if k[0] == "imgclf_predictions_total"}
    assert predicted == set(classes)
