"""Champion and challenger served side by side (service/rollout.py): canary share, x-model-version pins,
shadow agreement, and the hot reload of both slots under load. Real `bentoml serve` processes of the
session's two LeNet versions (tests/conftest.py rollout_registry), one at a time."""

from __future__ import annotations

import functools
import itertools
import math
import shutil
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.harness import Server
from service.settings import Settings, SettingsError
from tests.test_deploy import WITH_A_CHALLENGER
from tests.test_reliability_service import ONE, SteadyLoad, _publish_variant

IMAGES = {"images": np.random.default_rng(7).integers(0, 256, (2, 28, 28)).tolist()}


@functools.cache
def binomial_bounds(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """The central `level` range of Binomial(n, p), exactly: the largest lo with P[X < lo] <= (1 - level) / 2
    and the smallest hi with P[X > hi] <= (1 - level) / 2."""
    q = Fraction(p).limit_denominator(10**6)
    pmf = [math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)]  # exact rationals
    tail = Fraction(1 - level).limit_denominator(10**6) / 2
    below = list(itertools.accumulate(pmf))  # below[k] = P[X <= k]
    lo = next(k for k in range(n + 1) if below[k] > tail)  # P[X < lo] <= tail
    hi = next(k for k in range(n, -1, -1) if 1 - (below[k - 1] if k else 0) > tail)  # P[X > hi] <= tail
    return lo, hi


def test_binomial_bounds_of_known_cases():
    # Binomial(10, 1/2): P[X <= 1] = 11/1024 <= 0.05 < P[X <= 2] = 56/1024, and symmetrically above
    assert binomial_bounds(10, 0.5, level=0.9) == (2, 8)
    # Binomial(1000, 0.3): mean 300, sd 14.49; the normal approximation gives 300 -/+ 37.3
    assert binomial_bounds(1000, 0.3) == (263, 338)


def rollout_env(root, name, **extra) -> dict:
    return {"ARTIFACTS_DIR": str(root), "MODEL_NAME": name, "MODEL_VERSION": "", **extra}


@pytest.fixture(scope="module")
def canary_server(rollout_registry):
    root, name, _, _ = rollout_registry
    with Server(rollout_env(root, name, CANARY_PERCENT="30", RELOAD_POLL_S="0")) as s:
        yield s


@pytest.mark.slow
def test_a_30_percent_canary_answers_within_the_binomial_99_percent_bounds(canary_server, rollout_registry):
    _, _, champion, challenger = rollout_registry
    info = httpx.get(canary_server.url + "/model_info", timeout=10).json()
    assert info["model_version"] == champion and info["canary_percent"] == 30 and info["shadow"] is False
    assert info["challenger"]["model_version"] == challenger and info["challenger"]["error"] is None, info
    with httpx.Client(timeout=30) as c:
        answers = [c.post(canary_server.url + "/predict", json=ONE) for _ in range(1000)]
    assert {r.status_code for r in answers} == {200}
    versions = Counter(r.json()["model_version"] for r in answers)
    lo, hi = binomial_bounds(1000, 0.3)
    print(f"\ncanary 30%: {dict(versions)}; 99% bounds of the challenger's count: {lo}..{hi}")
    assert set(versions) <= {champion, challenger}, versions
    assert lo <= versions[challenger] <= hi, (versions, lo, hi)
    # the share is visible per version in the metrics (one latency observation per request)
    text = httpx.get(canary_server.url + "/metrics", timeout=10).text
    for version in (champion, challenger):
        line = f'imgclf_inference_latency_seconds_count{{endpoint="/predict",model_version="{version}"}}'
        assert any(ln.startswith(line) and float(ln.split()[-1]) >= versions[version] for ln in text.splitlines())


@pytest.mark.slow
def test_a_pinned_request_is_answered_by_the_version_it_names(canary_server, rollout_registry, tmp_path):
    from PIL import Image

    _, _, champion, challenger = rollout_registry
    png = tmp_path / "x.png"
    Image.fromarray(np.arange(784, dtype=np.uint8).reshape(28, 28)).save(png)
    for version in (champion, challenger):
        pin = {"x-model-version": version}
        for _ in range(20):  # the canary would answer some of them with the other version
            r = httpx.post(canary_server.url + "/predict", json=IMAGES, headers=pin, timeout=10)
            assert r.status_code == 200 and r.json()["model_version"] == version, r.text
            r = httpx.post(canary_server.url + "/predict_image", headers=pin, timeout=10,
                           files={"file": ("x.png", png.read_bytes(), "image/png")})
            assert r.status_code == 200 and r.json()["model_version"] == version, r.text


@pytest.mark.slow
def test_a_pin_to_a_version_not_loaded_is_409_naming_the_loaded_versions(canary_server, rollout_registry, tmp_path):
    from PIL import Image

    _, _, champion, challenger = rollout_registry
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    for path, kw in [("/predict", {"json": IMAGES}),
                     ("/predict_image", {"files": {"file": ("x.png", png.read_bytes(), "image/png")}})]:
        r = httpx.post(canary_server.url + path, headers={"x-model-version": "20200101-000000-deadbeef"},
                       timeout=10, **kw)
        assert r.status_code == 409, r.text
        body = r.json()
        assert body["reason"] == "version_not_loaded" and r.headers["x-imgclf-reason"] == "version_not_loaded"
        assert champion in body["error"] and challenger in body["error"] and "20200101" in body["error"], body
    assert httpx.post(canary_server.url + "/predict", json=ONE, timeout=10).status_code == 200
    text = httpx.get(canary_server.url + "/metrics", timeout=10).text
    assert 'imgclf_rejected_requests_total{endpoint="/predict",reason="version_not_loaded"} 1.0' in text


@pytest.mark.slow
def test_shadow_agreement_over_the_test_set_equals_the_stored_predictions_agreement(rollout_registry, fashion):
    from core import registry

    root, name, champion, challenger = rollout_registry
    a = registry.version_predictions(root, name, champion).predictions
    b = registry.version_predictions(root, name, challenger).predictions
    expected_agree = int((a == b).sum())
    x = fashion.test_x[:, 0].numpy()
    assert len(x) == len(a) == 10_000
    key = f'challenger="{challenger}",champion="{champion}"'
    with Server(rollout_env(root, name, SHADOW="1", BACKEND="torch", RELOAD_POLL_S="0")) as s:
        with httpx.Client(timeout=60) as c:
            for i in range(0, len(x), 100):
                r = c.post(s.url + "/predict", json={"images": x[i:i + 100].tolist(), "top_k": 1})
                assert r.status_code == 200 and r.json()["model_version"] == champion, r.text[:300]
            deadline = time.monotonic() + 30
            while True:
                text = c.get(s.url + "/metrics").text
                counts = {agree: _value(text, f'imgclf_shadow_agreement_total{{agree="{agree}",{key}}}')
                          for agree in ("true", "false")}
                if sum(counts.values()) >= 10_000 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    print(f"\nshadow: {counts}; stored predictions agree on {expected_agree} of 10,000")
    assert _value(text, "imgclf_shadow_dropped_total") == 0
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert WITH_A_CHALLENGER <= exposed and "imgclf_shadow_dropped_total" in exposed  # what the dashboard reads
    assert counts == {"true": expected_agree, "false": 10_000 - expected_agree}, counts


def _value(text: str, series: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " "))


@pytest.mark.slow
def test_moving_both_aliases_under_load_with_a_canary_loses_no_request(rollout_registry, tmp_path):
    from core import registry

    src, name, champion, challenger = rollout_registry
    root = tmp_path / "artifacts"
    shutil.copytree(Path(src) / name, root / name)
    new_champion = _publish_variant(root, name, champion, 1e-3)
    new_challenger = _publish_variant(root, name, challenger, 1e-3)
    env = rollout_env(root, name, CANARY_PERCENT="50", RELOAD_POLL_S="0.5")
    with Server(env, workers=1) as s:
        with SteadyLoad(s.url, 4) as load:
            time.sleep(2)
            registry.promote(root, name, new_challenger, alias=registry.CHALLENGER)
            time.sleep(3)
            # force: this test is about the switch, not the gate (the variant's bias shift may cost accuracy)
            registry.promote(root, name, new_champion, force=True)
            moved_at = time.monotonic()
            time.sleep(5)
        info = httpx.get(s.url + "/model_info", timeout=10).json()
    codes = Counter(code for _, code, _ in load.answers)
    versions = Counter(v for _, _, v in load.answers)
    print(f"\nreload with a 50% canary: {len(load.answers)} answers {dict(codes)}, versions {dict(versions)}")
    assert not load.failures, load.failures[:3]
    assert set(codes) == {200}, codes
    assert set(versions) == {champion, challenger, new_champion, new_challenger}, versions
    settled = Counter(v for t, _, v in load.answers if t > moved_at + 2)
    assert set(settled) == {new_champion, new_challenger}, settled
    assert info["model_version"] == new_champion and info["challenger"]["model_version"] == new_challenger, info


@pytest.mark.slow
def test_a_challenger_that_fails_to_load_never_serves_and_model_info_says_why(rollout_registry, tmp_path):
    src, name, champion, challenger = rollout_registry
    root = tmp_path / "artifacts"
    shutil.copytree(Path(src) / name, root / name)
    weights = root / name / challenger / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with Server(rollout_env(root, name, CANARY_PERCENT="100", RELOAD_POLL_S="0")) as s:
        answers = {httpx.post(s.url + "/predict", json=ONE, timeout=10).json()["model_version"] for _ in range(20)}
        info = httpx.get(s.url + "/model_info", timeout=10).json()
        log = s.log()
    assert answers == {champion}
    assert info["challenger"]["model_version"] is None and "integrity" in info["challenger"]["error"], info
    assert "CHALLENGER REFUSED" in log


@pytest.mark.parametrize("env, words", [
    ({"CANARY_PERCENT": "101"}, "CANARY_PERCENT must be a number 0..100 (0: off), got '101'"),
    ({"CANARY_PERCENT": "-1"}, "CANARY_PERCENT must be a number 0..100"),
    ({"CANARY_PERCENT": "half"}, "CANARY_PERCENT must be a number 0..100"),
    ({"CANARY_PERCENT": "nan"}, "CANARY_PERCENT must be a number 0..100"),
    ({"SHADOW": "yes"}, "SHADOW must be 0 (off) or 1 (on), got 'yes'"),
    ({"CHALLENGER": "../v1"}, "CHALLENGER must be an alias or a version"),
])
def test_bad_rollout_settings_are_refused_in_one_line(env, words):
    with pytest.raises(SettingsError) as e:
        Settings.from_env(env)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_rollout_settings_defaults_and_values():
    assert (Settings().challenger, Settings().canary_percent, Settings().shadow) == ("challenger", 0, False)
    s = Settings.from_env({"CHALLENGER": "none", "CANARY_PERCENT": "12.5", "SHADOW": "1"})
    assert (s.challenger, s.canary_percent, s.shadow) == (None, 12.5, True)
    assert Settings.from_env({"CHALLENGER": ""}).challenger is None
