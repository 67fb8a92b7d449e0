"""The statistics behind the constants of the monitoring alerts (deploy/prometheus/alerts.yml), read
from the shipped file and checked on simulated traffic: the figures docs/serving.md ("Alerts") quotes.
The rules themselves run under promtool in tests/test_deploy.py."""

from __future__ import annotations

import re

import numpy as np
import yaml

from tests.test_deploy import DEPLOY

OFFLINE_N, OFFLINE_P = 10_000, 0.9068   # lenet's offline test set
BATCH, WINDOW = 100, 36                  # 100 labelled images every 10 minutes; 6 hours = 36 batches


def constants() -> dict[str, float]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    by_name = {r.get("alert") or r["record"]: r for r in rules}
    acc, drift = by_name["ImgclfAccuracyBelowOffline"], by_name["ImgclfPredictionMixDrift"]
    assert "[6h]" in by_name["model_version:imgclf_evaluated_samples:increase6h"]["expr"] and acc["for"] == "10m"
    return {"z": float(re.search(r"shortfall:z6h > ([\d.]+)", acc["expr"])[1]),
            "min_evaluated": int(re.search(r"increase6h >= (\d+)", acc["expr"])[1]),
            "tvd": float(re.search(r"tvd1h > ([\d.]+)", drift["expr"])[1]),
            "min_predictions": int(re.search(r"increase1h >= (\d+)", drift["expr"])[1])}


def shortfall(correct_in_window: np.ndarray, n: int, p0: np.ndarray) -> np.ndarray:
    """The rule's z: (p0 - p) / sqrt(p0 (1 - p0) / n0 + p (1 - p) / n)."""
    p = correct_in_window / n
    return (p0 - p) / np.sqrt(p0 * (1 - p0) / OFFLINE_N + p * (1 - p) / n)


def days_with_an_alert(live_p: float, days: int, rng) -> float:
    """Share of days on which the accuracy alert fires: each day a version whose offline accuracy is a
    Binomial(10,000, 0.9068) draw, then 24 hours of batches; the window's z changes once per batch, so
    the rule's `for: 10m` means two consecutive batches above the bound."""
    c = constants()
    p0 = rng.binomial(OFFLINE_N, OFFLINE_P, size=(days, 1)) / OFFLINE_N
    correct = rng.binomial(BATCH, live_p, size=(days, 144 + WINDOW))
    cs = np.concatenate([np.zeros((days, 1)), correct.cumsum(1)], axis=1)
    z = shortfall(cs[:, WINDOW:] - cs[:, :-WINDOW], WINDOW * BATCH, p0)
    above = z > c["z"]
    return float((above[:, 1:] & above[:, :-1]).any(1).mean())


def test_a_healthy_labelled_stream_rarely_fires_the_accuracy_alert():
    """The same true accuracy live and offline: the alert fires on fewer than 1 day in 200 (5 of the 4,000
    simulated days), though each healthy 100-image batch falls below the old last-batch bound 44% of the time."""
    rng = np.random.default_rng(0)
    assert days_with_an_alert(OFFLINE_P, 4000, rng) < 0.005
    old_bound = OFFLINE_P - 1.96 * np.sqrt(OFFLINE_P * (1 - OFFLINE_P) / OFFLINE_N)
    assert 0.40 < (rng.binomial(BATCH, OFFLINE_P, 100_000) / BATCH < old_bound).mean() < 0.48
    assert WINDOW * BATCH >= constants()["min_evaluated"]


def test_the_accuracy_alert_catches_real_trouble():
    c = constants()
    rng = np.random.default_rng(1)
    # 2,000 images at 0.85 in the window (z about 6.7): 99.9% of the draws of both samples fire
    p0 = rng.binomial(OFFLINE_N, OFFLINE_P, 10_000) / OFFLINE_N
    assert (shortfall(rng.binomial(2000, 0.85, 10_000), 2000, p0) > c["z"]).mean() > 0.998
    # a full window of 3,600 images at 0.88 (2.7 points below) fires on most days
    assert days_with_an_alert(0.88, 500, rng) > 0.9
    # the window's accuracy must fall below 0.8457 at the minimum of 500 images, below 0.8842 at 3,600
    for n, bound in ((500, 0.8457), (WINDOW * BATCH, 0.8842)):
        assert shortfall(np.array([bound * n]), n, OFFLINE_P)[0] > c["z"] > \
            shortfall(np.array([(bound + 0.0003) * n]), n, OFFLINE_P)[0]
    # a stream of 0.908 that drops to 0.85: the window is significant after 15 bad batches, not 14
    def z_after(bad: int) -> float:
        return shortfall(np.array([(WINDOW - bad) * 90.8 + bad * 85.0]), WINDOW * BATCH, OFFLINE_P)[0]
    assert z_after(14) < c["z"] < z_after(15)


def test_sampling_noise_alone_stays_below_the_drift_threshold():
    """The hour's predicted-class mix against the offline one when nothing drifted: the total variation
    distance of a multinomial sample of the minimum count against a 10,000-image estimate of the same mix."""
    c = constants()
    rng = np.random.default_rng(2)
    for mix in (np.full(10, 0.1), np.array([0.15, 0.05, 0.10, 0.10, 0.12, 0.08, 0.10, 0.10, 0.10, 0.10])):
        live = rng.multinomial(c["min_predictions"], mix, size=200_000) / c["min_predictions"]
        offline = rng.multinomial(OFFLINE_N, mix, size=200_000) / OFFLINE_N
        tvd = 0.5 * np.abs(live - offline).sum(1)
        assert tvd.max() < 0.14 < c["tvd"]
        assert np.quantile(tvd, 0.5) < 0.06
    # one predicted class for the hour: 1 - its offline share, far above the threshold
    assert 1 - 0.108 > c["tvd"] * 4
