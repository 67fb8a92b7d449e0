"""Paired evaluation on real servers: `compare` on /evaluate (JSON) and /evaluate_npz (form field), its
refusals, its documentation in /docs.json, and, with a challenger loaded, the answer against the CLI compare."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from bench.harness import Server
from core import registry
from core.metrics import mcnemar_exact
from service.paired import NO_CHALLENGER
from tests.test_paired_evaluation import PAIRED, cli_compare
from tests.test_service_http import IMG, npz_bytes, post


@pytest.fixture(scope="module")
def server(lenet_server):
    return lenet_server  # the session's server: a champion and no challenger


@pytest.fixture(scope="module")
def official_test(fashion):
    return fashion.test_x[:, 0].numpy(), fashion.test_y.numpy()  # (N, 28, 28) uint8, (N,)


def npz_post(server, x, y, compare: str | None):
    data = {} if compare is None else {"compare": compare}
    return post(server, "/evaluate_npz", files={"file": ("t.npz", npz_bytes(images=x, labels=y))}, data=data)


def test_compare_without_a_challenger_is_409_and_bad_values_are_400(server, official_test):
    x, y = official_test
    body = {"images": x[:20].tolist(), "labels": y[:20].tolist()}
    plain = post(server, "/evaluate", json=body).json()
    assert "challenger" not in plain and "comparison" not in plain
    assert post(server, "/evaluate", json={**body, "compare": False}).json() == plain
    for form in ("false", "0"):
        r = npz_post(server, x[:20], y[:20], form)
        assert r.status_code == 200 and r.json() == plain, (form, r.text)
    for r in (post(server, "/evaluate", json={**body, "compare": True}), npz_post(server, x[:20], y[:20], "true"),
              npz_post(server, x[:20], y[:20], "1")):
        assert r.status_code == 409, r.text
        assert (r.json()["reason"], r.headers["x-imgclf-reason"], r.json()["error"]) == \
            ("no_challenger", "no_challenger", NO_CHALLENGER)
    for bad in ("true", 1, 0, None, "yes", [True], 1.5):
        r = post(server, "/evaluate", json={"images": [IMG], "labels": [0], "compare": bad})
        assert r.status_code == 400 and r.json()["reason"] == "compare", (bad, r.text)
        assert r.json()["error"].startswith("compare must be true or false (a JSON boolean), got "), r.text
    for bad in ("yes", "True", "2", "1.0", "", "null", '"true"'):
        r = npz_post(server, x[:2], y[:2], bad)
        assert r.status_code == 400 and r.json()["reason"] == "compare", (bad, r.text)
        assert r.json()["error"] == f'compare must be "true", "false", "1" or "0", got {bad!r}', r.text
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def test_docs_json_documents_the_compare_field_and_the_409(server):
    spec = httpx.get(server.url + "/docs.json", timeout=10).json()
    for path, media in (("/evaluate", "application/json"), ("/evaluate_npz", "multipart/form-data")):
        op = spec["paths"][path]["post"]
        field = op["requestBody"]["content"][media]["schema"]["properties"]["compare"]
        assert (field["type"], field["default"]) == ("boolean", False), field
        assert "compare" not in op["requestBody"]["content"][media]["schema"].get("required", [])
        assert "409" in op["responses"] and "no_challenger" in op["responses"]["409"]["description"]
    answer = spec["components"]["schemas"]["PairedComparison"]
    assert set(PAIRED) | {"a", "b", "diff", "diff_ci95", "verdict", "alpha"} == set(answer["required"])


def _samples(text: str, metric: str, version: str) -> float:
    found = re.search(rf'^{metric}{{model_version="{re.escape(version)}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_paired_evaluate_with_a_challenger_loaded_equals_the_cli_compare(rollout_registry, official_test):
    root, name, champion, challenger = rollout_registry
    x, y = official_test
    env = {"ARTIFACTS_DIR": str(root), "MODEL_NAME": name, "MODEL_VERSION": champion, "CHALLENGER": challenger}
    with Server(env) as s:
        info = httpx.get(s.url + "/model_info", timeout=10).json()
        assert info["challenger"]["model_version"] == challenger
        r = npz_post(s, x, y, "true")
        assert r.status_code == 200, r.text
        got, cli = r.json(), cli_compare(rollout_registry)
        assert {k: got["comparison"][k] for k in PAIRED} == {k: cli[k] for k in PAIRED}
        assert (got["comparison"]["a"], got["comparison"]["b"]) == (champion, challenger)
        assert (got["model_version"], got["challenger"]["model_version"]) == (champion, challenger)
        # 200 images as JSON: the figures of the two versions' stored predictions on those images
        idx = np.arange(1000, 1200)
        r = post(s, "/evaluate", json={"images": x[idx].tolist(), "labels": y[idx].tolist(), "compare": True})
        assert r.status_code == 200, r.text
        pa, pb = (registry.version_predictions(root, name, v) for v in (champion, challenger))
        ra, rb = (pa.predictions == pa.labels).numpy()[idx], (pb.predictions == pb.labels).numpy()[idx]
        a_only, b_only = int((ra & ~rb).sum()), int((~ra & rb).sum())
        c = r.json()["comparison"]
        assert (c["n"], c["a_correct"], c["b_correct"], c["a_right_b_wrong"], c["a_wrong_b_right"], c["mcnemar_p"]) \
            == (200, int(ra.sum()), int(rb.sum()), a_only, b_only, mcnemar_exact(a_only, b_only))
        plain = post(s, "/evaluate", json={"images": x[idx].tolist(), "labels": y[idx].tolist()}).json()
        assert plain == {k: v for k, v in r.json().items() if k not in ("challenger", "comparison")}
        # each version's evaluation counted under its own label (the plain request: the champion only)
        text = httpx.get(s.url + "/metrics", timeout=30).text
        assert _samples(text, "imgclf_evaluated_samples_total", champion) == 10000 + 200 + 200
        assert _samples(text, "imgclf_evaluated_samples_total", challenger) == 10000 + 200
        assert _samples(text, "imgclf_evaluated_correct_total", challenger) == got["comparison"]["b_correct"] + \
            c["b_correct"]
