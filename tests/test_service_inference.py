"""service/inference.py in-process: validation of every kind of bad input, and answers that agree with core.metrics."""

from __future__ import annotations

import dataclasses
import io
import json
import time

import numpy as np
import pytest
import torch

from core import artifacts
from core.manifest import InputSpec
from core.metrics import confusion_matrix
from service.inference import (
    Classifier,
    InputError,
    decode_image_file,
    parse_images,
    parse_labels,
    parse_npz,
    parse_predict_request,
    parse_top_k,
)
from service.inference import _regular_uint8 as regular_uint8

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.286,), std=(0.353,))
RGB = dataclasses.replace(SPEC, channels=3)
IMG = [[0] * 28 for _ in range(28)]


def img(value=0):
    return [[value] * 28 for _ in range(28)]


def refused(value, spec=SPEC, **kw) -> InputError:
    with pytest.raises(InputError) as e:
        parse_images(value, spec, **kw)
    assert str(e.value) and e.value.reason
    return e.value


def test_good_batches_keep_their_pixels():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28))
    out = parse_images(x.tolist(), SPEC)
    assert out.dtype == np.uint8 and out.shape == (5, 1, 28, 28)
    assert np.array_equal(out[:, 0], x)
    # explicit channel axis and whole-number floats are the same images
    assert np.array_equal(parse_images(x[:, None].tolist(), SPEC), out)
    assert np.array_equal(parse_images(x.astype(float).tolist(), SPEC), out)
    colour = rng.integers(0, 256, (2, 3, 28, 28))
    assert np.array_equal(parse_images(colour.tolist(), RGB), colour.astype(np.uint8))


def test_the_common_request_takes_the_c_loops_and_gets_the_same_pixels():
    """Regular integer lists of the model's shape skip numpy's nested-list conversion; the array is the same,
    and writable (torch.from_numpy warns on read-only arrays)."""
    rng = np.random.default_rng(2)
    for spec, shape in ((SPEC, (3, 28, 28)), (SPEC, (1, 28, 28)), (RGB, (2, 3, 28, 28))):
        x = rng.integers(0, 256, shape)
        x[0, 0, 0], x[-1, -1, -1] = 0, 255  # both ends of the range
        fast = regular_uint8(x.tolist(), *spec.shape)
        assert fast is not None and fast.flags.writeable and fast.flags.c_contiguous
        assert fast.dtype == np.uint8 and np.array_equal(fast, x.reshape(-1, *spec.shape))
        assert np.array_equal(parse_images(x.tolist(), spec), fast)


@pytest.mark.parametrize("value", [
    [img()[:27]], [[row[:27] if i == 5 else row for i, row in enumerate(img())]], [img(), img()[:27]],
    [[img()] * 3], [[["7"] + [0] * 27] + img()[1:]], [[[True] + [0] * 27] + img()[1:]], [[[False] * 28] * 28],
    [[[None] + [0] * 27] + img()[1:]], [img(256)], [img(-1)], [img(10**30)], [img(1.0)], [img(float("nan"))],
    [[[[0]] * 28] * 28], [[0] * 28] * 28, [[img()]],  # one level too deep, one too shallow, (N, 1, H, W)
])
def test_everything_else_takes_the_full_checks(value):
    assert regular_uint8(value, *SPEC.shape) is None


@pytest.mark.parametrize("value, reason, words", [
    (None, "missing", "null"),
    ("abc", "type", "list"),
    ({"a": 1}, "type", "list"),
    ([], "empty", "empty"),
    ([img()[:27]], "shape", "27x28"),
    ([[row[:27] if i == 5 else row for i, row in enumerate(img())]], "shape", "ragged"),
    ([[[0] * 28] * 28] * 1 + [[[0] * 28] * 27], "shape", "images[1]"),
    ([[img()] * 3], "shape", "3 channels"),
    ([[["7"] + [0] * 27] + img()[1:]], "type", "string"),
    ([[[True] + [0] * 27] + img()[1:]], "type", "boolean"),
    ([[[False] * 28] * 28], "type", "boolean"),
    ([[[None] + [0] * 27] + img()[1:]], "type", "null"),
    ([[[{}] + [0] * 27] + img()[1:]], "type", "object"),
    ([img(256)], "range", "0..255"),
    ([img(-1)], "range", "0..255"),
    ([img(10**30)], "range", "0..255"),
    ([img(float("nan"))], "range", "NaN"),
    ([img(float("inf"))], "range", "Infinity"),
    ([img(0.5)], "range", "whole numbers"),
    ([[[[[[[[[[1]]]]]]]]]], "shape", "nested"),
    (img(), "shape", None),  # one image not wrapped in a batch
    ([1, 2, 3], "shape", None),
])
def test_bad_images_are_refused_with_a_message(value, reason, words):
    e = refused(value)
    assert e.reason == reason, str(e)
    assert e.status == 400
    if words:
        assert words in str(e), str(e)


def test_too_many_images_is_413_and_names_the_limit():
    e = refused([IMG] * 5, max_images=4)
    assert e.status == 413 and "4" in str(e) and "MAX_IMAGES" in str(e)


def test_absurd_nesting_does_not_recurse_forever():
    deep: list = [1]
    for _ in range(5000):
        deep = [deep]
    assert refused(deep).reason == "shape"


def test_validation_is_vectorised():
    """1,000 images validate in well under a second on 2 shared cores (numpy, not per-pixel Python)."""
    batch = np.random.default_rng(1).integers(0, 256, (1000, 28, 28)).tolist()
    parse_images(batch, SPEC, max_images=1000)
    t = time.perf_counter()
    parse_images(batch, SPEC, max_images=1000)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("labels, n, reason, words", [
    (None, 1, "missing", "null"),
    ("3", 1, "type", "list"),
    ([1.5], 1, "type", "labels[0]"),
    (["3"], 1, "type", "string"),
    ([True], 1, "type", "boolean"),
    ([None], 1, "type", "labels[0]"),
    ([1, 2], 1, "count", "2 labels for 1 images"),
    ([10], 1, "range", "0..9"),
    ([-1], 1, "range", "0..9"),
])
def test_bad_labels(labels, n, reason, words):
    with pytest.raises(InputError) as e:
        parse_labels(labels, n, 10)
    assert e.value.reason == reason and words in str(e.value), str(e.value)


@pytest.mark.parametrize("top_k", ["3", True, 3.0, None, 0, 11, [3], {"k": 3}])
def test_top_k_is_strict(top_k):
    """Only a JSON integer 1..10: "3", true and 3.0 are refused, not converted."""
    with pytest.raises(InputError) as e:
        parse_top_k(top_k, 10)
    assert e.value.reason == "top_k" and e.value.status == 400
    assert str(e.value).startswith("top_k must be an integer 1..10, got ")


def test_top_k_is_limited_by_the_number_of_classes():
    assert parse_top_k(3, 10) == 3 and parse_top_k(10, 10) == 10
    with pytest.raises(InputError, match=r"1\.\.4, got 5"):
        parse_top_k(5, 4)


def test_parse_predict_request_checks_images_and_top_k():
    x, top_k = parse_predict_request({"images": [IMG, IMG]}, SPEC, 10)
    assert x.shape == (2, 1, 28, 28) and top_k == 3  # top_k is optional
    assert parse_predict_request({"images": [IMG], "top_k": 5}, SPEC, 10)[1] == 5
    for payload, reason in [({"images": [IMG], "top_k": "5"}, "top_k"), ({"images": [IMG[:3]]}, "shape"),
                            ({}, "missing"), ({"images": [IMG] * 3}, "too_many")]:
        with pytest.raises(InputError) as e:
            parse_predict_request(payload, SPEC, 10, max_images=2)
        assert e.value.reason == reason, (payload, str(e.value))


def test_good_labels():
    assert parse_labels([0, 9, 3], 3, 10).tolist() == [0, 9, 3]


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_npz_round_trip():
    x = np.random.default_rng(2).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = np.arange(7) % 10
    images, labels = parse_npz(npz(images=x, labels=y), SPEC, 10)
    assert images.shape == (7, 1, 28, 28) and np.array_equal(images[:, 0], x) and labels.tolist() == y.tolist()


@pytest.mark.parametrize("data, reason", [
    (b"", "format"),
    (b"not a zip", "format"),
    (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", "format"),  # a pickle
    (b"PK\x03\x04broken", "format"),
    (npz(images=np.zeros((2, 28, 28), np.uint8)), "missing"),
    (npz(images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, int)), "type"),
    (npz(images=np.zeros((2, 32, 32), np.uint8), labels=np.zeros(2, int)), "shape"),
    (npz(images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, int)), "empty"),
    (npz(images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(3, int)), "count"),
    (npz(images=np.zeros((2, 28, 28), np.uint8), labels=np.array([0.5, 1.0])), "type"),
    (npz(images=np.zeros((2, 28, 28), np.uint8), labels=np.array([0, 10])), "range"),
    (npz(images=np.zeros((2, 28, 28), np.uint8), labels=np.array([{"x": 1}, 2], dtype=object)), "pickle"),
])
def test_bad_npz(data, reason):
    with pytest.raises(InputError) as e:
        parse_npz(data, SPEC, 10)
    assert e.value.reason == reason, str(e.value)
    assert e.value.status == 400


def test_object_arrays_in_npz_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(InputError):
        parse_npz(npz(images=np.zeros((1, 28, 28), np.uint8), labels=np.array([Boom()], dtype=object)), SPEC, 10)
    assert not marker.exists()


def png(array: np.ndarray, fmt: str = "PNG", mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def test_image_files_become_model_input():
    x = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    assert np.array_equal(decode_image_file(png(x), SPEC)[0, 0], x)  # PNG is lossless at the model's size
    big = decode_image_file(png(np.full((100, 60, 3), 200, np.uint8), "JPEG", "RGB"), SPEC)
    assert big.shape == (1, 1, 28, 28) and abs(int(big.mean()) - 200) <= 2  # greyscale, resized


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, not an image", "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not_an_image"),
])
def test_bad_image_files(data, reason):
    with pytest.raises(InputError) as e:
        decode_image_file(data, SPEC)
    assert e.value.reason == reason


def test_other_image_formats_are_415():
    with pytest.raises(InputError) as e:
        decode_image_file(png(np.zeros((28, 28), np.uint8), "GIF"), SPEC)
    assert e.value.status == 415 and "PNG or JPEG" in str(e.value)


@pytest.fixture(scope="module")
def classifier(lenet_version):
    root, name, version, _ = lenet_version
    return Classifier(artifacts.load(root, name, version), torch.device("cpu"))


@pytest.fixture(scope="module")
def test_set():
    from training.data import load_dataset

    ds = load_dataset("fashion_mnist")
    return ds.test_x.numpy(), ds.test_y.numpy()


def test_evaluate_reproduces_the_manifest(classifier, test_set, lenet_version):
    x, y = test_set
    answer = classifier.evaluate(x, y)
    manifest = lenet_version[3]
    assert answer["model_version"] == lenet_version[2]
    assert answer["n"] == 10_000
    assert abs(answer["accuracy"] - manifest["test_accuracy"]) * 10_000 <= 5
    assert answer["confusion_matrix"] == manifest["confusion_matrix"]
    lo, hi = answer["accuracy_ci95"]
    assert lo < answer["accuracy"] < hi
    assert answer["consistent_with_offline"] is True and answer["consistency_test"]["alpha"] == 0.05
    json.dumps(answer)  # plain JSON types only


def test_predict_agrees_with_evaluate(classifier, test_set):
    x, y = test_set[0][:500], test_set[1][:500]
    preds = classifier.predict(x)
    labels = np.array([p["label"] for p in preds])
    answer = classifier.evaluate(x, y)
    assert answer["accuracy"] == float((labels == y).mean())
    cm = confusion_matrix(torch.from_numpy(y), torch.from_numpy(labels), 10)
    assert answer["confusion_matrix"] == cm.tolist()
    for p in preds[:20]:
        assert p["top_k"][0]["label"] == p["label"] and p["top_k"][0]["probability"] == p["probability"]
        assert [t["probability"] for t in p["top_k"]] == sorted((t["probability"] for t in p["top_k"]), reverse=True)
        assert p["class_name"] == classifier.classes[p["label"]]


def test_a_batch_answers_as_its_parts(classifier, test_set):
    x = test_set[0][:64]
    whole = [p["label"] for p in classifier.predict(x)]
    parts = [p["label"] for i in range(0, 64, 16) for p in classifier.predict(x[i:i + 16])]
    assert whole == parts


def test_top_k_is_checked(classifier):
    with pytest.raises(InputError):
        classifier.predict(np.zeros((1, 1, 28, 28), np.uint8), top_k=0)
    assert len(classifier.predict(np.zeros((1, 1, 28, 28), np.uint8), top_k=10)[0]["top_k"]) == 10


def test_predict_equals_a_direct_computation_with_the_model(classifier, test_set, lenet_version):
    """The served probabilities are softmax(logits / T) on the manifest's normalisation, with the manifest's
    calibration temperature T, written out here."""
    root, name, version, manifest = lenet_version
    loaded = artifacts.load(root, name, version)
    spec = manifest["input"]
    x = test_set[0][:300]
    mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"]).view(1, -1, 1, 1)
    t = manifest["calibration"]["temperature"]
    with torch.no_grad():
        logits = loaded.model.eval()((torch.from_numpy(x).float() / 255.0 - mean) / std)
    probs = (logits / t).softmax(1)
    assert torch.equal(probs.argmax(1), logits.argmax(1))
    preds = classifier.predict(x, top_k=3)
    assert [p["label"] for p in preds] == probs.argmax(1).tolist()
    got = torch.tensor([p["probability"] for p in preds])
    assert torch.allclose(got, probs.max(1).values, atol=1e-5)
    top3 = probs.topk(3, dim=1).indices.tolist()
    assert [[t["label"] for t in p["top_k"]] for p in preds] == top3
    # evaluate counts what the direct computation gets right
    y = test_set[1][:300]
    answer = classifier.evaluate(x, y)
    assert answer["n"] == 300
    assert sum(answer["confusion_matrix"][k][k] for k in range(10)) == int((probs.argmax(1).numpy() == y).sum())


def test_consistency_with_the_offline_test_set(classifier, lenet_version):
    """evaluation_answer: the offline confusion matrix itself is consistent; a far worse batch is not."""
    manifest = lenet_version[3]
    same = classifier.evaluation_answer(torch.tensor(manifest["confusion_matrix"]))
    assert same["accuracy"] == pytest.approx(manifest["test_accuracy"])
    assert same["consistent_with_offline"] is True
    assert same["consistency_test"]["p_value"] == pytest.approx(1.0)
    lo, hi = same["accuracy_ci95"]
    assert lo < manifest["test_accuracy"] < hi and hi - lo < 0.02  # n = 10,000: a narrow interval

    # 1,000 images at 50% accuracy (500 on the diagonal, the rest one class off)
    cm = torch.zeros(10, 10, dtype=torch.int64)
    for k in range(10):
        cm[k, k] = 50
        cm[k, (k + 1) % 10] = 50
    worse = classifier.evaluation_answer(cm)
    assert worse["n"] == 1000 and worse["accuracy"] == pytest.approx(0.5)
    assert worse["consistent_with_offline"] is False
    assert worse["consistency_test"]["p_value"] < 1e-6 and worse["consistency_test"]["alpha"] == 0.05
    lo, hi = worse["accuracy_ci95"]
    assert lo < 0.5 < hi and hi < manifest["test_accuracy"]

    # 200 images two points below the offline accuracy stay consistent (the test is not over-eager)
    correct = round((manifest["test_accuracy"] - 0.02) * 200)
    cm = torch.zeros(10, 10, dtype=torch.int64)
    for i in range(200):
        k = i % 10
        cm[k, k if i < correct else (k + 1) % 10] += 1
    small = classifier.evaluation_answer(cm)
    assert small["n"] == 200 and small["accuracy"] == pytest.approx(correct / 200)
    assert small["consistent_with_offline"] is True and small["consistency_test"]["p_value"] > 0.05


def test_decoded_image_files_are_writable_for_torch(classifier):
    """PIL's buffer is read-only and torch.from_numpy warns on it (a UserWarning in the server log)."""
    x = decode_image_file(png(np.zeros((28, 28), np.uint8)), SPEC)
    assert x.flags.writeable
    assert len(classifier.predict(x)) == 1  # no warning (pytest turns warnings into errors)
