"""/metrics of a real 2-worker `bentoml serve`: the project's imgclf_* metrics, aggregated over the
workers (one series per version, not per worker), BentoML's own, and every name the dashboard and
the alert rules use."""

from __future__ import annotations

import concurrent.futures as cf
import re

import httpx
import pytest

from bench.harness import Server
from tests.conftest import lenet_env
from tests.test_deploy import WITH_A_CHALLENGER, metric_names_used

pytestmark = pytest.mark.slow

IMG = [[0] * 28 for _ in range(28)]


def _samples(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric in Prometheus text format."""
    out = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def post(server, path, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=120, **kw)


@pytest.fixture(scope="module")
def two_workers(lenet_version, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml-home")  # its own: `bentoml serve` empties the metrics folder there
    # 4 evaluations at once below may all reach one worker (the kernel picks): allow 4 per worker,
    # so a 429 here is a bug (the HEAVY_CONCURRENCY refusal itself is tested in test_scale)
    env = {**lenet_env(lenet_version), "BENTOML_HOME": str(home), "HEAVY_CONCURRENCY": "4"}
    with Server(env, workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def scrape(two_workers, fashion, lenet_version):
    """Traffic on both workers, then one scrape: (metrics text, facts about the traffic sent)."""
    s = two_workers
    x, y = fashion.test_x[:, 0].numpy(), fashion.test_y.numpy()
    prom = s.home / "prometheus_multiproc_dir"

    def pids(kind: str) -> set[str]:  # worker pids that wrote a file of this kind
        return set(re.findall(rf"{kind}_(\d+)\.db", " ".join(p.name for p in prom.iterdir())))

    # concurrent evaluations until both workers have set the accuracy gauge (which one accepts
    # a connection is the kernel's choice, so sequential requests may all reach one worker)
    batch = {"images": x[:100].tolist(), "labels": y[:100].tolist()}
    n_eval = 0
    with cf.ThreadPoolExecutor(4) as pool:
        for _ in range(15):
            answers = list(pool.map(lambda _: post(s, "/evaluate", json=batch), range(4)))
            assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers if a.status_code != 200]
            n_eval += 4
            if len(pids("gauge_mostrecent")) >= 2:
                break
    assert len(pids("gauge_mostrecent")) >= 2, sorted(p.name for p in prom.iterdir())
    assert len(pids("gauge_max")) == 2 and len(pids("gauge_livemax")) == 2  # both workers set these at start
    # then one more, on other images: the most recent evaluation wins, whichever worker ran it
    last = post(s, "/evaluate", json={"images": x[100:300].tolist(), "labels": y[100:300].tolist()}).json()
    for i in range(8):
        assert post(s, "/predict", json={"images": x[i * 5:(i + 1) * 5].tolist()}).status_code == 200
    assert post(s, "/predict", json={"images": []}).status_code == 400
    assert post(s, "/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    text = httpx.get(s.url + "/metrics", timeout=30).text
    return text, {"n_eval": n_eval, "last_accuracy": last["accuracy"]}


def test_accuracy_gauges_have_one_series_per_version(scrape, lenet_version):
    text, sent = scrape
    version = lenet_version[2]
    label = f'{{model_version="{version}"}}'
    acc = _samples(text, "imgclf_evaluation_accuracy")
    assert acc == {label: pytest.approx(sent["last_accuracy"])}, acc  # the last evaluation; no per-worker series
    assert _samples(text, "imgclf_offline_test_accuracy") == {label: pytest.approx(lenet_version[3]["test_accuracy"])}
    assert _samples(text, "imgclf_model_info") == {f'{{model_name="lenet",model_version="{version}"}}': 1.0}
    assert not [line for line in text.splitlines() if line.startswith("imgclf_") and 'pid="' in line]


def test_counters_and_histograms_add_up_over_the_workers(scrape, lenet_version):
    text, sent = scrape
    version, n_eval = lenet_version[2], sent["n_eval"]
    label = f'{{model_version="{version}"}}'
    assert _samples(text, "imgclf_evaluated_samples_total") == {label: 100.0 * n_eval + 200}
    predictions = _samples(text, "imgclf_predictions_total")
    assert sum(predictions.values()) == 40.0
    assert all(f'model_version="{version}"' in k and "class_name=" in k for k in predictions)
    count = _samples(text, "imgclf_inference_latency_seconds_count")
    assert count[f'{{endpoint="/evaluate",model_version="{version}"}}'] == n_eval + 1
    assert count[f'{{endpoint="/predict",model_version="{version}"}}'] == 8
    assert 'imgclf_inference_latency_seconds_bucket{endpoint="/predict",le="0.005",model_version=' in text
    assert _samples(text, "imgclf_batch_size_count")['{endpoint="/evaluate"}'] == n_eval + 1
    assert _samples(text, "imgclf_batch_size_sum")['{endpoint="/predict"}'] == 40.0
    rejected = _samples(text, "imgclf_rejected_requests_total")
    assert rejected.get('{endpoint="/predict",reason="empty"}') == 1.0, rejected
    assert rejected.get('{endpoint="/predict",reason="content_type"}') == 1.0, rejected
    requests = _samples(text, "bentoml_service_request_total")  # BentoML's own metrics stay
    assert requests and any('endpoint="/evaluate"' in k and 'http_response_code="200"' in k for k in requests), requests
    # /predict is answered outside BentoML's middlewares (service/front.py), which counts it in the same metrics
    durations = _samples(text, "bentoml_service_request_duration_seconds_count")
    for code, n in {"200": 8.0, "400": 1.0, "415": 1.0}.items():
        for name, series in (("request_total", requests), ("request_duration_seconds_count", durations)):
            got = sum(v for k, v in series.items()
                      if 'endpoint="/predict"' in k and f'http_response_code="{code}"' in k)
            assert got == n, (name, code, got, series)


def test_every_metric_the_dashboard_and_alerts_use_is_scraped(scrape):
    text, _ = scrape
    exposed = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M))
    exposed |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed}
    used = metric_names_used() - WITH_A_CHALLENGER  # this server serves no challenger
    assert used and not used - exposed, sorted(used - exposed)
