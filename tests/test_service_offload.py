"""Large /predict bodies are parsed in a child process (service/offload.py), so other clients keep their
answers while two 56 MB bodies are parsed, and the large bodies get the same answers as before."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from bench.harness import Server
from tests.conftest import lenet_env


def _big_body(images: int) -> bytes:
    """`images` 28x28 images of 255s (3.1 KB each) in one /predict body, built without a 56 MB json.dumps."""
    one = json.dumps(np.full((28, 28), 255).tolist(), separators=(",", ":")).encode()
    return b'{"images":[' + b",".join([one] * images) + b"]}"


@pytest.mark.slow
def test_two_56_mb_bodies_leave_other_clients_answered(lenet_version, fashion):
    big = _big_body(18_000)
    assert len(big) > 56e6
    small = {"images": [fashion.test_x[0, 0].tolist()]}
    # MAX_BODY_MB=64: by default a JSON body over the largest legal one (3.95 MiB) is a 413 before it is read
    # (tests/test_body_limit.py); a user who raises the limit keeps the event loop free all the same
    env = lenet_env(lenet_version) | {"MAX_BODY_MB": "64"}
    with Server(env, workers=1) as s:  # one worker: every request shares its event loop
        expected = httpx.post(s.url + "/predict", json=small, timeout=30).json()
        answers: list[httpx.Response] = []

        def post_big():
            answers.append(httpx.post(s.url + "/predict", content=big, timeout=120,
                                      headers={"content-type": "application/json"}))

        posters = [threading.Thread(target=post_big) for _ in range(2)]
        latencies = []
        with httpx.Client(timeout=60) as client:
            started = time.perf_counter()
            for t in posters:
                t.start()
            while any(t.is_alive() for t in posters):
                t0 = time.perf_counter()
                r = client.post(s.url + "/predict", json=small)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json() == expected
            big_seconds = time.perf_counter() - started
        for t in posters:
            t.join()
    # the large bodies: the answer they always had (more images than MAX_IMAGES)
    assert [a.status_code for a in answers] == [413, 413]
    assert all(a.json()["reason"] == "too_many" and "18000 images" in a.json()["error"] for a in answers)
    # the small client was answered all along: parsed on the event loop (or on a thread: the parse holds the
    # GIL), each 56 MB body stopped it for seconds, most of the large requests' time
    assert len(latencies) >= 5
    assert max(latencies) < 0.25 * big_seconds, \
        f"slowest small request {max(latencies):.2f} s while the large ones took {big_seconds:.1f} s"


@pytest.mark.slow
def test_a_large_body_gets_the_answer_of_a_small_one(lenet_server, fashion):
    images = fashion.test_x[:400, 0].numpy()
    body = json.dumps({"images": images.tolist(), "top_k": 2}).encode()
    assert len(body) > 1 << 20  # over offload.LARGE_BODY_BYTES
    s = lenet_server  # the session's 1-worker server
    large = httpx.post(s.url + "/predict", content=body, headers={"content-type": "application/json"}, timeout=60)
    parts = [httpx.post(s.url + "/predict", json={"images": images[i:i + 100].tolist(), "top_k": 2}, timeout=60)
             for i in range(0, 400, 100)]
    refused = httpx.post(s.url + "/predict", content=body.replace(b'"top_k": 2', b'"top_k": 11'),
                         headers={"content-type": "application/json"}, timeout=60)
    invalid = httpx.post(s.url + "/predict", content=body.replace(b'"top_k": 2', b'"top_k": [2'),
                         headers={"content-type": "application/json"}, timeout=60)
    assert large.status_code == 200
    got, want = large.json()["predictions"], [p for r in parts for p in r.json()["predictions"]]
    assert [(p["label"], [k["label"] for k in p["top_k"]]) for p in got] == \
        [(p["label"], [k["label"] for k in p["top_k"]]) for p in want]
    assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in want], abs=1e-5)
    assert refused.status_code == 400 and refused.json()["reason"] == "top_k"  # the endpoint's own refusal
    assert invalid.status_code == 400 and invalid.json()["reason"] == "validation"  # BentoML's, reworded
