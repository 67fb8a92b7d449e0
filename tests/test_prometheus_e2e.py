"""A real Prometheus, with the shipped scrape config and rules, scrapes a real service."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
import yaml

from bench.harness import free_port, stop, wait_ready
from tests.test_deploy import DEPLOY, WITH_A_CHALLENGER, metric_names_used

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prometheus(lenet_server, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: make tools (apt-get install prometheus)"
    d = tmp_path_factory.mktemp("prometheus")
    target = lenet_server.url.removeprefix("http://")
    # the shipped file, with only the target and the intervals changed for a test of seconds
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    config = config.replace('"localhost:3000"', f'"{target}"').replace("15s", "1s")
    assert target in config
    (d / "prometheus.yml").write_text(config)
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", d / "alerts.yml")
    port = free_port()
    with open(d / "log", "w") as log:
        proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda: httpx.get(url + "/-/ready", timeout=1).status_code == 200, proc, timeout=60,
                   log=(d / "log").read_text)
        yield url
    finally:
        stop(proc, timeout=20)


def _query(url: str, expr: str, timeout: float = 40) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=5).json()
        assert r["status"] == "success", r
        if r["data"]["result"]:
            return r["data"]["result"]
        time.sleep(1)
    raise AssertionError(f"Prometheus has no data for {expr} after {timeout} s")


def test_prometheus_scrapes_the_service_and_answers_for_accuracy(prometheus, lenet_server, lenet_version, fashion):
    _, _, version, manifest = lenet_version
    # one evaluation, so the evaluated-accuracy gauge exists
    x, y = fashion.test_x[:200, 0].tolist(), fashion.test_y[:200].tolist()
    answer = httpx.post(lenet_server.url + "/evaluate", json={"images": x, "labels": y}, timeout=60).json()
    offline = _query(prometheus, "imgclf_offline_test_accuracy")
    assert {s["metric"]["model_version"] for s in offline} == {version}
    assert float(offline[0]["value"][1]) == pytest.approx(manifest["test_accuracy"])
    evaluated = _query(prometheus, f'imgclf_evaluation_accuracy{{model_version="{version}"}}')
    assert float(evaluated[0]["value"][1]) == pytest.approx(answer["accuracy"])
    up = _query(prometheus, 'up{job="imgclf"}')
    assert up[0]["value"][1] == "1"


def test_prometheus_loaded_the_shipped_rules(prometheus):
    groups = httpx.get(prometheus + "/api/v1/rules", timeout=5).json()["data"]["groups"]
    rules = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert set(rules) == {r.get("alert") or r["record"] for r in shipped}
    assert {"ImgclfAccuracyBelowOffline", "ImgclfPredictionMixDrift", "ImgclfHighLatencyP99", "ImgclfHighErrorRate",
            "ImgclfNoModelLoaded", "model_version:imgclf_prediction_share:tvd1h"} <= set(rules)
    assert all(h in ("ok", "unknown") for h in rules.values()), rules


def test_every_metric_the_dashboard_and_rules_name_is_scraped(lenet_server):
    # traffic on every endpoint that feeds a metric, including a refused request
    httpx.post(lenet_server.url + "/predict", json={"images": [np.zeros((28, 28), int).tolist()]}, timeout=30)
    httpx.post(lenet_server.url + "/predict", json={"images": []}, timeout=30)
    httpx.post(lenet_server.url + "/evaluate", json={"images": [np.zeros((28, 28), int).tolist()], "labels": [0]},
               timeout=30)
    scrape = httpx.get(lenet_server.url + "/metrics", timeout=30).text
    present = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and not line.startswith("#")}
    present |= {n.removesuffix("_total") for n in present} | {n.rsplit("_", 1)[0] for n in present}
    missing = sorted(m for m in metric_names_used() - WITH_A_CHALLENGER if m not in present)  # no challenger here
    assert not missing, f"named by the dashboard or rules but not exported: {missing}"
