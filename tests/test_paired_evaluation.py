"""Paired evaluation in-process: the one home of the paired figures (core.metrics.paired_comparison), the
registry's compare built on it, and the service's /evaluate and /evaluate_npz with `compare` (service/paired.py)
on two real LeNet versions, against the CLI compare and the versions' stored test predictions."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from core import artifacts, registry
from core.manifest import InputSpec
from core.metrics import mcnemar_exact, paired_comparison, paired_difference_interval
from service.inference import Classifier, InputError
from service.paired import NO_CHALLENGER, challenger_for, parse_compare
from tests.conftest import ROOT

# --- the paired figures ---------------------------------------------------------------------

# (A right per image, B right per image) -> n, a_correct, b_correct, a_right_b_wrong, a_wrong_b_right, mcnemar_p
HAND = [
    # one discordant pair each way: p = min(1, 2 * P[Binomial(2, 1/2) <= 1]) = 1
    ([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], (5, 3, 3, 1, 1, 1.0)),
    # no discordant pairs: no evidence, p = 1
    ([1, 0, 1], [1, 0, 1], (3, 2, 2, 0, 0, 1.0)),
    # all 10 discordant one way (A right, B wrong): p = 2 / 2**10
    ([1] * 10, [0] * 10, (10, 10, 0, 10, 0, 0.001953125)),
    # 20 images: 12 both right, 1 A only, 6 B only, 1 both wrong: p = 2 * (1 + 7) / 2**7
    ([1] * 12 + [1] + [0] * 6 + [0], [1] * 12 + [0] + [1] * 6 + [0], (20, 13, 18, 1, 6, 0.125)),
]


@pytest.mark.parametrize("right_a, right_b, expected", HAND)
def test_paired_comparison_by_hand(right_a, right_b, expected):
    for kind in (list, np.array, lambda v: torch.tensor(v, dtype=torch.bool)):
        f = paired_comparison(kind(right_a), kind(right_b))
        n, a_correct, b_correct, a_only, b_only, p = expected
        assert (f["n"], f["a_correct"], f["b_correct"], f["a_right_b_wrong"], f["a_wrong_b_right"]) == expected[:5]
        assert f["mcnemar_p"] == pytest.approx(p, rel=1e-12)
        assert f["diff"] == pytest.approx((b_correct - a_correct) / n)
        assert f["diff_ci95"] == paired_difference_interval(n, a_only, b_only)


def test_paired_comparison_verdicts_and_interval_by_hand():
    one_way = paired_comparison([1] * 10, [0] * 10)
    assert one_way["verdict"] == "A better" and one_way["diff"] == -1.0
    # Agresti-Min: centre (0.5 - 10.5) / 12, half 1.96 * sqrt(11 - 100/12) / 12; the lower end clipped at -1
    assert one_way["diff_ci95"] == (-1.0, pytest.approx(-10 / 12 + 1.959964 * (11 - 100 / 12) ** 0.5 / 12))
    assert paired_comparison([0] * 10, [1] * 10)["verdict"] == "B better"
    assert paired_comparison([1] * 10, [0] * 10, alpha=0.001)["verdict"] == "no significant difference"
    assert paired_comparison(*HAND[3][:2])["verdict"] == "no significant difference"  # p = 0.125
    assert paired_comparison([], [])["n"] == 0 and paired_comparison([], [])["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="same images: 3 vs 2"):
        paired_comparison([1, 0, 1], [1, 0])


def test_registry_compare_equals_the_paired_figures_of_the_stored_predictions(rollout_registry):
    root, name, champion, challenger = rollout_registry
    pa = registry.version_predictions(root, name, champion)
    pb = registry.version_predictions(root, name, challenger)
    ra, rb = (pa.predictions == pa.labels).tolist(), (pb.predictions == pb.labels).tolist()
    a_only = sum(a and not b for a, b in zip(ra, rb))
    b_only = sum(b and not a for a, b in zip(ra, rb))
    c = registry.compare(root, name, champion, challenger)
    assert (c.n, c.a_correct, c.b_correct, c.a_right_b_wrong, c.a_wrong_b_right) == \
        (10000, sum(ra), sum(rb), a_only, b_only)
    assert c.mcnemar_p == mcnemar_exact(a_only, b_only) and c.diff == (sum(rb) - sum(ra)) / 10000
    assert c.diff_ci95 == paired_difference_interval(10000, a_only, b_only)
    assert c.verdict == "A better"  # the challenger is the weaker version (1 epoch on 6,000 images)
    assert {k: v for k, v in c.to_dict().items() if k in paired_comparison([], [])} == \
        {**paired_comparison(ra, rb), "diff_ci95": list(c.diff_ci95)}


# --- the `compare` field --------------------------------------------------------------------

def test_parse_compare_takes_a_json_boolean_and_the_form_values_true_false_1_0():
    assert (parse_compare(True), parse_compare(False)) == (True, False)
    # a form value arrives JSON-decoded by BentoML: "true" -> True, "1" -> 1
    assert [parse_compare(v, form=True) for v in (True, False, 1, 0)] == [True, False, True, False]
    for bad in ("true", 1, 0, None, 1.0, [], {}):
        with pytest.raises(InputError, match="compare must be true or false") as e:
            parse_compare(bad)
        assert (e.value.status, e.value.reason) == (400, "compare")
    for bad in ("yes", "True", 2, -1, 1.0, None, "", "1"):
        with pytest.raises(InputError, match='compare must be "true", "false", "1" or "0"') as e:
            parse_compare(bad, form=True)
        assert (e.value.status, e.value.reason) == (400, "compare")
    # the refusal quotes the form value as it was sent: a quoted "true" arrives decoded to the string true
    for decoded, sent in (("true", '"true"'), (2, "2"), (None, "null"), ("yes", "yes")):
        with pytest.raises(InputError) as e:
            parse_compare(decoded, form=True)
        assert str(e.value).endswith(f"got {sent!r}"), e.value


GREY28 = InputSpec(1, 28, 28, (0.5,), (0.5,))
COLOUR32 = InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3)


def test_compare_needs_a_loaded_challenger_with_the_same_classes():
    champion = SimpleNamespace(version="v1", classes=["a", "b"], spec=GREY28)
    with pytest.raises(InputError, match="none is loaded: set CHALLENGER") as e:
        challenger_for(champion, None)
    assert (e.value.status, e.value.reason) == (409, "no_challenger") and "--alias challenger" in NO_CHALLENGER
    different = r"v1 and challenger v2 differ in classes \(\['a', 'b'\] vs \['a', 'c'\]\)"
    with pytest.raises(InputError, match=different) as e:
        challenger_for(champion, SimpleNamespace(version="v2", classes=["a", "c"], spec=GREY28))
    assert (e.value.status, e.value.reason) == (409, "not_comparable")
    same = SimpleNamespace(version="v2", classes=["a", "b"], spec=GREY28)
    assert challenger_for(champion, same) is same


def test_compare_refuses_a_challenger_of_another_input_shape_saying_what_differs():
    """The shared check (service/rollout.compatible): the same classes are not enough, the input shape must match."""
    champion = SimpleNamespace(version="v1", classes=["a", "b"], spec=GREY28)
    with pytest.raises(InputError) as e:
        challenger_for(champion, SimpleNamespace(version="v3", classes=["a", "b"], spec=COLOUR32))
    assert (e.value.status, e.value.reason) == (409, "not_comparable")
    assert str(e.value) == "champion v1 and challenger v3 differ in input shape (28x28 vs 3x32x32): their answers " \
                           "cannot be paired"
    with pytest.raises(InputError) as e:  # both differ: both are named
        challenger_for(champion, SimpleNamespace(version="v4", classes=["x"], spec=COLOUR32))
    assert str(e.value) == "champion v1 and challenger v4 differ in input shape (28x28 vs 3x32x32) and classes " \
                           "(['a', 'b'] vs ['x']): their answers cannot be paired"


# --- the service's endpoints, in-process on two real versions ----------------------------------

@pytest.fixture(scope="module")
def pair(rollout_registry):
    root, name, champion, challenger = rollout_registry
    return tuple(Classifier(artifacts.load(root, name, v), torch.device("cpu")) for v in (champion, challenger))


@pytest.fixture(scope="module")
def official_test(fashion):
    return fashion.test_x.numpy(), fashion.test_y.numpy()  # (N, 1, 28, 28) uint8, (N,) int64


def service(champion: Classifier, challenger: Classifier | None):
    """The service object with its endpoint logic and metrics, without BentoML's server or __init__'s loading;
    `challenger` is the attribute the champion/challenger loading sets (None: none loaded)."""
    from service import metrics

    with warnings.catch_warnings():  # pathspec's deprecation, raised while BentoML's SDK is imported
        warnings.simplefilter("ignore", DeprecationWarning)
        from service.service import ImageClassifier

    svc = ImageClassifier.inner.__new__(ImageClassifier.inner)
    svc.model, svc.challenger, svc.metrics = champion, challenger, metrics.get()
    return svc


def answer(response) -> tuple[int, dict]:
    return response.status_code, json.loads(response.body)


def counted(version: str) -> tuple[float, float]:
    labels = {"model_version": version}
    return tuple(REGISTRY.get_sample_value(f"imgclf_evaluated_{what}_total", labels) or 0.0
                 for what in ("samples", "correct"))


def cli_compare(rollout_registry) -> dict:
    root, name, champion, challenger = rollout_registry
    out = subprocess.run([sys.executable, "-m", "training", "compare", "--json", "--artifacts-dir", str(root), name,
                          champion, challenger], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


PAIRED = ("n", "a_correct", "b_correct", "a_right_b_wrong", "a_wrong_b_right", "mcnemar_p")


def test_paired_evaluate_npz_on_the_test_set_equals_the_cli_compare_and_counts_each_version(
        pair, official_test, rollout_registry, tmp_path):
    champion, challenger = pair
    x, y = official_test
    npz = tmp_path / "test.npz"
    buf = io.BytesIO()
    np.savez(buf, images=x[:, 0], labels=y)
    npz.write_bytes(buf.getvalue())
    before = {v: counted(v) for v in (champion.version, challenger.version)}
    status, got = answer(service(champion, challenger).evaluate_npz(file=npz, compare=1))  # the form's "1"
    assert status == 200, got
    cli = cli_compare(rollout_registry)
    comparison = got["comparison"]
    assert {k: comparison[k] for k in PAIRED} == {k: cli[k] for k in PAIRED}
    assert (comparison["a"], comparison["b"]) == (cli["a"], cli["b"]) == (champion.version, challenger.version)
    assert comparison["diff"] == pytest.approx(cli["diff"]) and comparison["verdict"] == cli["verdict"]
    assert comparison["diff_ci95"] == pytest.approx(cli["diff_ci95"]) and comparison["alpha"] == cli["alpha"]
    # the champion's usual answer, and the challenger's own block, each as its plain evaluation
    assert {k: v for k, v in got.items() if k not in ("challenger", "comparison")} == champion.evaluate(x, y)
    assert got["challenger"] == challenger.evaluate(x, y)
    assert got["challenger"]["model_version"] == challenger.version
    for v, block in ((champion.version, got), (challenger.version, got["challenger"])):
        correct = sum(row[i] for i, row in enumerate(block["confusion_matrix"]))
        assert counted(v) == (before[v][0] + 10000, before[v][1] + correct)
        labels = {"model_version": v}
        assert REGISTRY.get_sample_value("imgclf_evaluation_accuracy", labels) == block["accuracy"]


def test_paired_evaluate_on_a_subset_equals_the_stored_predictions(pair, official_test, rollout_registry):
    root, name, a, b = rollout_registry
    x, y = official_test
    idx = np.sort(np.random.default_rng(13).choice(len(y), 300, replace=False))
    status, got = answer(service(*pair).evaluate(images=x[idx, 0].tolist(), labels=y[idx].tolist(), compare=True))
    assert status == 200, got
    pa, pb = (registry.version_predictions(root, name, v) for v in (a, b))
    ra = (pa.predictions == pa.labels).numpy()[idx]
    rb = (pb.predictions == pb.labels).numpy()[idx]
    a_only, b_only = int((ra & ~rb).sum()), int((~ra & rb).sum())
    c = got["comparison"]
    assert (c["n"], c["a_correct"], c["b_correct"], c["a_right_b_wrong"], c["a_wrong_b_right"]) == \
        (300, int(ra.sum()), int(rb.sum()), a_only, b_only)
    assert c["mcnemar_p"] == mcnemar_exact(a_only, b_only)
    assert (got["n"], got["challenger"]["n"]) == (300, 300)


def test_compare_false_is_the_plain_answer_and_bad_values_or_no_challenger_are_refused(pair, official_test):
    champion, challenger = pair
    x, y = official_test
    images, labels = x[:50, 0].tolist(), y[:50].tolist()
    plain = champion.evaluate(x[:50], y[:50])
    for svc in (service(champion, challenger), service(champion, None)):
        assert answer(svc.evaluate(images=images, labels=labels)) == (200, plain)
        assert answer(svc.evaluate(images=images, labels=labels, compare=False)) == (200, plain)
        status, got = answer(svc.evaluate(images=images, labels=labels, compare="yes"))
        assert (status, got["reason"]) == (400, "compare") and "compare must be true or false" in got["error"]
    status, got = answer(service(champion, None).evaluate(images=images, labels=labels, compare=True))
    assert (status, got["reason"], got["error"]) == (409, "no_challenger", NO_CHALLENGER)


def test_compare_with_a_challenger_of_another_input_shape_is_a_409_on_both_endpoints(pair, official_test, tmp_path):
    champion, _ = pair
    x, y = official_test
    other = SimpleNamespace(version="colour-v1", classes=list(champion.classes), spec=COLOUR32)
    npz = tmp_path / "few.npz"
    buf = io.BytesIO()
    np.savez(buf, images=x[:20, 0], labels=y[:20])
    npz.write_bytes(buf.getvalue())
    svc = service(champion, other)
    for response in (svc.evaluate(images=x[:20, 0].tolist(), labels=y[:20].tolist(), compare=True),
                     svc.evaluate_npz(file=npz, compare=1)):
        status, got = answer(response)
        assert (status, got["reason"]) == (409, "not_comparable"), got
        assert got["error"].startswith(f"champion {champion.version} and challenger colour-v1 differ in input shape "
                                       "(28x28 vs 3x32x32):"), got


def test_the_evaluate_endpoints_stay_synchronous():
    """BentoML runs a synchronous API on a thread of its pool: the two passes of a paired evaluation never
    hold the event loop (an `async def` endpoint would run them on it)."""
    svc = service(*[SimpleNamespace()] * 2)
    for endpoint in (svc.evaluate, svc.evaluate_npz):
        assert not inspect.iscoroutinefunction(endpoint) and not inspect.iscoroutinefunction(endpoint.__wrapped__)
