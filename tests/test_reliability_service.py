"""Reliability of the running service (issue 7): limits (413, 413, 504, 429), load and overload
with wrk, hot reload under load, graceful shutdown. Every test runs real `bentoml serve` processes
of the real LeNet version and stops them; wrk is always waited for."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.harness import Server, running, wrk
from tests.conftest import ROOT, lenet_env

pytestmark = pytest.mark.slow

IMG = [[0] * 28 for _ in range(28)]
ONE = {"images": [IMG]}


def _random_images(n: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).tolist()


def _recovers(server: Server, within: float = 10.0) -> float:
    """Seconds until a plain /predict answers 200 again (fails after `within`)."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < within:
        try:
            last = httpx.post(server.url + "/predict", json=ONE, timeout=5)
            if last.status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"no 200 from /predict within {within} s; last: {last!r}")


# ------------------------------------------------------------------------------------------
# 1. limits


@pytest.fixture(scope="module")
def limit_servers(lenet_version):
    """The module's servers started together (start-up is the slow part): small body and image limits,
    a tiny request timeout, one request in flight per worker, 8 in flight (the overload test), and a plain
    one that the shutdown test stops. One worker each."""
    env = lenet_env(lenet_version)
    servers = {
        "small": Server({**env, "MAX_BODY_MB": "0.05", "MAX_IMAGES": "4"}),
        "timeout": Server({**env, "REQUEST_TIMEOUT": "0.05"}),
        "one_at_a_time": Server({**env, "MAX_CONCURRENCY": "1"}),
        "eight_at_a_time": Server({**env, "MAX_CONCURRENCY": "8"}, workers=1),
        "to_stop": Server(env, workers=1),
    }
    with running(*servers.values()):
        yield servers


def test_body_over_max_body_mb_is_413_with_a_clear_message(limit_servers):
    s = limit_servers["small"]
    body = {"images": [IMG] * 40}  # ~63 KB of JSON, over 0.05 MB (52,428 bytes)
    r = httpx.post(s.url + "/predict", json=body, timeout=10)
    assert r.status_code == 413, r.text
    assert "MAX_BODY_MB" in r.json()["error"] and r.json()["reason"] == "too_large"

    def chunks():  # no Content-Length: counted while read
        data = json.dumps(body).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = httpx.post(s.url + "/evaluate", content=chunks(), headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413 and "MAX_BODY_MB" in r.json()["error"]
    assert httpx.post(s.url + "/predict", json=ONE, timeout=10).status_code == 200


def test_more_images_than_max_images_is_413_with_a_clear_message(limit_servers):
    s = limit_servers["small"]
    for path, body in [("/predict", {"images": [IMG] * 5}), ("/evaluate", {"images": [IMG] * 5, "labels": [0] * 5})]:
        r = httpx.post(s.url + path, json=body, timeout=10)
        assert r.status_code == 413, (path, r.text)
        assert "MAX_IMAGES" in r.json()["error"] and "limit is 4" in r.json()["error"], r.text
    r = httpx.post(s.url + "/predict", json={"images": [IMG] * 4}, timeout=10)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4
    assert httpx.get(s.url + "/model_info", timeout=10).json()["limits"]["max_images"] == 4


def test_a_request_over_request_timeout_is_504_and_the_server_keeps_serving(limit_servers):
    s = limit_servers["timeout"]
    body = {"images": _random_images(1024), "labels": [0] * 1024}
    r = httpx.post(s.url + "/evaluate", json=body, timeout=30)
    assert r.status_code == 504, r.text[:500]
    assert "0.05 seconds" in r.json()["error"], r.text
    _recovers(s)


def test_a_predict_over_request_timeout_is_504_and_the_server_keeps_serving(limit_servers):
    """/predict is answered outside BentoML's middlewares (service/front.py), which applies the same time-out."""
    s = limit_servers["timeout"]
    r = httpx.post(s.url + "/predict", json={"images": _random_images(1024, seed=2)}, timeout=30)
    assert r.status_code == 504, r.text[:500]
    assert r.json() == {"error": "Not able to process the request in 0.05 seconds"}, r.text
    _recovers(s)


def test_over_max_concurrency_is_429_and_the_server_keeps_serving(limit_servers):
    s = limit_servers["one_at_a_time"]
    body = {"images": _random_images(1024, seed=1), "labels": [1] * 1024}
    payload = json.dumps(body)

    def send(_):
        with httpx.Client(timeout=60) as c:
            r = c.post(s.url + "/evaluate", content=payload, headers={"content-type": "application/json"})
            return r.status_code, {**r.json(), **({"retry-after": r.headers["retry-after"]} if r.status_code == 429
                                                  else {})}

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(24)))
    codes = Counter(code for code, _ in answers)
    assert set(codes) <= {200, 429}, codes
    assert codes[429] >= 1 and codes[200] >= 1, codes
    refusal = next(body for code, body in answers if code == 429)
    assert refusal["reason"] == "overloaded" and "MAX_CONCURRENCY" in refusal["error"], refusal
    assert refusal["retry-after"] == "1", refusal
    assert all(b["n"] == 1024 for code, b in answers if code == 200)
    _recovers(s)


# ------------------------------------------------------------------------------------------
# 2. load and overload (wrk)

def _wrk(url: str, connections: int, seconds: int) -> dict:
    """wrk POSTing one random image to `url`, every status code counted."""
    return wrk(url, json.dumps({"images": _random_images(1, seed=3)}).encode(), connections, seconds, threads=2,
               statuses=True)


@pytest.fixture
def needs_wrk():
    if not shutil.which("wrk"):
        pytest.fail("wrk is missing: apt-get install wrk")


def test_60s_at_64_connections_answers_only_2xx_and_memory_returns_near_its_start(lenet_server, needs_wrk):
    with contextlib.nullcontext(lenet_server) as s:  # the session's 1-worker server of the LeNet version
        warm = _wrk(s.url + "/predict", 64, 5)
        assert warm["non_2xx"] == 0, warm["text"]
        rss_before = s.worker_rss()
        r = _wrk(s.url + "/predict", 64, 60)
        rss_after = s.worker_rss()
        print(f"\nload: {r['requests']} requests, {r['requests_per_s']:.0f} req/s, non-2xx {r['non_2xx']}, "
              f"socket errors {r['socket_errors']}, worker RSS {rss_before / 2**20:.0f} MiB after warm-up, "
              f"{rss_after / 2**20:.0f} MiB after 60 s")
        assert r["requests"] > 1000, r["text"]
        assert r["non_2xx"] == 0 and set(r["statuses"]) == {200}, r["text"]
        assert r["socket_errors"] == (0, 0, 0, 0), r["text"]
        assert rss_after <= max(rss_before * 1.2, rss_before + 50 * 2**20), (rss_before, rss_after)
        _recovers(s, within=3)


def test_overload_answers_only_200_429_or_503_and_recovers(limit_servers, needs_wrk):
    with contextlib.nullcontext(limit_servers["eight_at_a_time"]) as s:
        sampled: Counter = Counter()
        stop = threading.Event()

        def sample():  # a second client beside wrk, reading every status code itself
            with httpx.Client(timeout=15) as c:
                while not stop.is_set():
                    r = c.post(s.url + "/predict", json=ONE)
                    sampled[r.status_code] += 1
                    if r.status_code == 429 and r.headers.get("retry-after") != "1":
                        sampled["429 without Retry-After"] += 1

        samplers = [threading.Thread(target=sample) for _ in range(4)]
        for t in samplers:
            t.start()
        try:
            r = _wrk(s.url + "/predict", 128, 15)
        finally:
            stop.set()
            for t in samplers:
                t.join(30)
        print(f"\noverload: {r['requests']} requests, {r['requests_per_s']:.0f} req/s, statuses {dict(r['statuses'])}, "
              f"non-2xx {r['non_2xx']}, socket errors {r['socket_errors']}; httpx sample {dict(sampled)}")
        assert set(r["statuses"]) <= {200, 429, 503}, r["text"]
        assert r["non_2xx"] == r["statuses"][429] + r["statuses"][503]
        assert set(sampled) <= {200, 429}, sampled
        assert r["statuses"][429] + sampled[429] > 0, "128 connections against 8 slots never reached the limit"
        assert r["statuses"][200] > 0
        took = _recovers(s, within=5)
        print(f"recovered: /predict 200 after {took:.2f} s")


# ------------------------------------------------------------------------------------------
# 3. hot reload under load


def _publish_variant(root: Path, name: str, source: str, shift: float) -> str:
    """A new version of the same model with every bias shifted a little (a different weights hash)."""
    from safetensors.torch import load_file

    from core import artifacts

    folder = root / name / source
    manifest = artifacts.read_manifest(folder).replace(files={}, test_predictions=None, onnx=None)
    state = load_file(folder / "model.safetensors")
    state = {k: (v + shift if k.endswith("bias") else v) for k, v in state.items()}
    time.sleep(1.1)  # version ids carry the publishing second
    return artifacts.publish(root, name, state, manifest).name


class SteadyLoad:
    """`clients` threads posting ONE to `url`/predict until the block ends. `answers`: (time, status, version)
    of each answer; `failures`: each request lost (an exception instead of an answer)."""

    def __init__(self, url: str, clients: int):
        self.url, self.answers, self.failures, self.stop = url, [], [], threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=15) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.url + "/predict", json=ONE)
                    self.answers.append((time.monotonic(), r.status_code, r.json().get("model_version")))
                except BaseException as e:  # noqa: BLE001 - a lost request is the failure we look for
                    self.failures.append(e)

    def __enter__(self) -> SteadyLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_hot_reload_under_load_loses_no_request_and_refuses_a_corrupt_version(lenet_version, tmp_path):
    from core import artifacts

    src_root, name, v1, _ = lenet_version
    root = tmp_path / "artifacts"
    shutil.copytree(Path(src_root) / name / v1, root / name / v1)
    v2 = _publish_variant(root, name, v1, 1e-3)
    artifacts.promote(root, name, v1)
    with Server({"ARTIFACTS_DIR": str(root), "MODEL_NAME": name, "MODEL_VERSION": "", "RELOAD_POLL_S": "0.5"},
                workers=2) as s:
        with SteadyLoad(s.url, 4) as load:
            time.sleep(2)
            promote_started = time.monotonic()  # the command imports torch first: the switch falls in between
            # --force: this test is about the switch, not the gate (the variant's bias shift may cost accuracy)
            out = subprocess.run([sys.executable, "-m", "training", "promote", "--force", "--artifacts-dir", str(root),
                                  name, v2], capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            promoted_at = time.monotonic()
            time.sleep(8)
            # a corrupt version promoted by hand (promote itself refuses it): the workers keep serving v2
            v3 = _publish_variant(root, name, v1, 2e-3)
            weights = root / name / v3 / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
            (root / name / ".PROMOTED.tmp").write_text(v3 + "\n")
            os.replace(root / name / ".PROMOTED.tmp", root / name / "PROMOTED")
            corrupted_at = time.monotonic()
            deadline = time.monotonic() + 20
            while s.log().count("RELOAD FAILED") < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)
        log = s.log()
        info = [httpx.get(s.url + "/model_info", timeout=10).json() for _ in range(4)]

    answers = load.answers
    assert not load.failures, load.failures[:3]
    codes = Counter(code for _, code, _ in answers)
    versions = Counter(v for _, _, v in answers)
    print(f"\nhot reload: {len(answers)} answers {dict(codes)}, versions {dict(versions)}")
    assert set(codes) == {200}, codes
    assert set(versions) == {v1, v2}, versions
    before = [v for t, _, v in answers if t < promote_started]
    assert before and set(before) == {v1}
    settled = [v for t, _, v in answers if promoted_at + 5 < t]
    assert settled and set(settled) == {v2}, Counter(settled)  # both workers switched within 5 s
    switch = max(t for t, _, v in answers if v == v1) - promote_started
    print(f"last answer from {v1} {switch:.2f} s after the promote command started "
          f"(it took {promoted_at - promote_started:.2f} s); corrupt {v3} refused")
    assert [v for t, _, v in answers if t > corrupted_at] and {v for t, _, v in answers if t > corrupted_at} == {v2}
    assert "RELOAD FAILED" in log and v3 in log, log[-3000:]
    assert all(i["model_version"] == v2 and v3 in (i["reload_error"] or "") for i in info), info


# ------------------------------------------------------------------------------------------
# 4. graceful shutdown


def _connect_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_lets_the_request_in_flight_finish_and_refuses_new_connections(limit_servers):
    import io

    with contextlib.nullcontext(limit_servers["to_stop"]) as s:  # started with the others; stopped here
        n = 80_000  # ~63 MB of pixels, under MAX_BODY_MB=64: seconds of work on 2 cores
        rng = np.random.default_rng(5)
        buf = io.BytesIO()
        np.savez(buf, images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, n))
        payload = buf.getvalue()
        result: dict = {}

        def evaluate():
            try:
                r = httpx.post(s.url + "/evaluate_npz", timeout=120,
                               files={"file": ("big.npz", payload, "application/octet-stream")})
                result["status"], result["body"] = r.status_code, r.json()
            except BaseException as e:  # noqa: BLE001
                result["error"] = e
            result["done_at"] = time.monotonic()

        t = threading.Thread(target=evaluate)
        t.start()
        time.sleep(1.5)
        sigterm_at = time.monotonic()
        os.killpg(s.proc.pid, signal.SIGTERM)
        refused = False
        while t.is_alive() and not refused:
            time.sleep(0.1)
            refused = _connect_refused(s.port)
        refused_while_in_flight = refused and t.is_alive()
        t.join(120)
        assert "done_at" in result and result["done_at"] > sigterm_at, "the request ended before the SIGTERM"
        assert "error" not in result, result
        assert result["status"] == 200, result
        assert result["body"]["n"] == n
        deadline = time.monotonic() + 30
        while not _connect_refused(s.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _connect_refused(s.port)
        s.proc.wait(30)
        print(f"\nshutdown: request finished {result['done_at'] - sigterm_at:.2f} s after SIGTERM with 200; "
              f"new connections refused while it ran: {refused_while_in_flight}")


# ------------------------------------------------------------------------------------------
# 6. dependencies


def test_requirements_pin_bentoml_at_or_after_its_advisory_fixes():
    """BentoML's pickle, SSRF and tar advisories were fixed in 1.4.3 to 1.4.39 (issue 7)."""
    pins = dict(line.split("==", 1) for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    version = tuple(int(part) for part in pins["bentoml"].strip().split(".")[:3])
    assert version >= (1, 4, 39), pins["bentoml"]


@pytest.mark.parametrize("proxy", [None, "http://127.0.0.1:9"], ids=["as-is", "advisory-service-unreachable"])
def test_make_audit_never_reports_a_pass_it_did_not_check(proxy):
    if not shutil.which("make"):
        pytest.fail("make is missing")
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "http_proxy", "all_proxy")}
    if proxy:
        env["HTTPS_PROXY"] = proxy
    out = subprocess.run(["make", "-s", "-o", ".venv/.installed", "audit", f"PY={sys.executable}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if proxy:
        assert out.returncode == 0 and last.startswith("audit skipped: the advisory service is unreachable"), text
    else:  # here: skipped (no advisory data reachable); where it is reachable: passed, or fails on a finding
        assert out.returncode == 0 and (last.startswith("audit skipped: ") or last.startswith("audit passed: ")), text
