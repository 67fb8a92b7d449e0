"""Fuzzing: schemathesis against the running service's own OpenAPI document, and hypothesis
properties of the inference code (service.inference.Classifier) on the real LeNet version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

API_ROUTES = ("/predict", "/evaluate", "/model_info", "/predict_image", "/evaluate_npz")
REFUSALS = {"400", "413", "415", "429", "503"}


@pytest.fixture(scope="module")
def fuzz_server(lenet_server):
    """The session's server: fuzzing only reads (the test checks that it still serves afterwards)."""
    return lenet_server


@pytest.mark.slow
def test_openapi_documents_every_refusal(fuzz_server):
    spec = httpx.get(fuzz_server.url + "/docs.json", timeout=10).json()
    for route in API_ROUTES:
        responses = spec["paths"][route]["post"]["responses"]
        assert REFUSALS <= set(responses), (route, sorted(responses))
        assert "504" in responses  # REQUEST_TIMEOUT
    schema = spec["components"]["schemas"]["ErrorAnswer"]
    assert schema["required"] == ["error"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(fuzz_server, tmp_path):
    """About 100 generated requests per operation (valid and invalid), checked for 5xx answers,
    statuses the spec does not list, and bodies that do not match the documented schema."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", fuzz_server.url + "/docs.json",
           "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance",
           "--include-path-regex", "^/(predict|evaluate|model_info|predict_image|evaluate_npz)$",
           "--max-examples", "100", "--seed", "7", "--workers", "1", "--no-color",
           "--generation-database", "none", "--request-timeout", "30",
           "--report", "junit", "--report-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path,
                         env={**os.environ, "NO_COLOR": "1"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "Tested: 5" in text, text[-3000:]
    assert " passed" in text and "failures" not in text.split("SUMMARY")[-1].lower(), text[-3000:]
    # the server is still healthy after the fuzzing
    assert httpx.post(fuzz_server.url + "/predict", json={"images": [[[0] * 28] * 28]}, timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------
# hypothesis properties, in-process on the real model


@pytest.fixture(scope="module")
def classifier(lenet_version):
    from core import artifacts
    from service.inference import Classifier

    root, name, version, _ = lenet_version
    return Classifier(artifacts.load(root, name, version), torch.device("cpu"))


def _images(seed: int, n: int) -> np.ndarray:
    """Half real-looking (smooth blobs), half noise: the model's answers are spread over classes."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    yy, xx = np.mgrid[:28, :28]
    cy, cx, r = rng.uniform(6, 22, n), rng.uniform(6, 22, n), rng.uniform(3, 12, n)
    blobs = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 < r[:, None, None] ** 2) * 255
    pick = rng.random(n) < 0.5
    return np.where(pick[:, None, None, None], noise, blobs[:, None].astype(np.uint8))


def _same_predictions(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)
        if p["label"] != q["label"]:  # only a near-tie may flip with the batch's float summation order
            top = sorted(p["top_k"], key=lambda t: -t["probability"])
            assert top[0]["probability"] - top[1]["probability"] < 1e-5, (p, q)


PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 600), data=st.data())
def test_predict_is_equivariant_to_permutation_of_the_batch(classifier, seed, n, data):
    x = _images(seed, n)
    perm = np.asarray(data.draw(st.permutations(range(n))))
    direct = classifier.predict(x, top_k=3)
    permuted = classifier.predict(x[perm], top_k=3)
    _same_predictions(permuted, [direct[i] for i in perm])


@PROPS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 600), data=st.data())
def test_a_batch_predicts_what_its_parts_predict(classifier, seed, n, data):
    x = _images(seed, n)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=4)))
    parts = [classifier.predict(part, top_k=2) for part in np.split(x, cuts)]
    _same_predictions(classifier.predict(x, top_k=2), [p for part in parts for p in part])


@PROPS
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(1, 300), min_size=2, max_size=4))
def test_evaluate_counts_add_up_over_concatenated_batches(classifier, seed, sizes):
    rng = np.random.default_rng(seed)
    xs = [_images(seed + i, k) for i, k in enumerate(sizes)]
    ys = [rng.integers(0, 10, k) for k in sizes]
    parts = [classifier.evaluate(x, y) for x, y in zip(xs, ys)]
    whole = classifier.evaluate(np.concatenate(xs), np.concatenate(ys))
    summed = np.sum([np.asarray(p["confusion_matrix"]) for p in parts], axis=0)
    assert np.array_equal(np.asarray(whole["confusion_matrix"]), summed)
    assert whole["n"] == sum(p["n"] for p in parts) == sum(sizes)
    correct = sum(round(p["accuracy"] * p["n"]) for p in parts)
    assert whole["accuracy"] == pytest.approx(correct / whole["n"])
    for c in range(10):  # per-class support is a row sum: it adds up too
        assert whole["per_class"][c]["support"] == sum(p["per_class"][c]["support"] for p in parts)
