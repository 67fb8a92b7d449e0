"""The HTTP contract against real `bentoml serve` processes: answers, bad input, limits, metrics, refusal.

Each server gets its own BENTOML_HOME: `bentoml serve` empties its Prometheus multiprocess folder
at start, so two servers sharing one home would wipe each other's metrics.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time

import httpx
import numpy as np
import pytest

from tests.conftest import Server, lenet_env

pytestmark = pytest.mark.slow

IMG = [[0] * 28 for _ in range(28)]


def start(tmp_path_factory, env: dict, workers: int = 1) -> Server:
    home = tmp_path_factory.mktemp("bentoml-home")
    server = Server({"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **env}, workers=workers)
    server.home = home
    return server


@pytest.fixture(scope="module")
def server(lenet_version, tmp_path_factory):
    s = start(tmp_path_factory, lenet_env(lenet_version))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def test_set():
    from training.data import load_dataset

    ds = load_dataset("fashion_mnist")
    return ds.test_x[:, 0].numpy(), ds.test_y.numpy()  # (N, 28, 28) uint8, (N,)


def post(server, path, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=120, **kw)


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# answers


def test_evaluate_full_test_set_in_json_chunks_reproduces_the_manifest(server, test_set, lenet_version):
    x, y = test_set
    manifest = lenet_version[3]
    correct = n = 0
    for i in range(0, 10_000, 1000):
        r = post(server, "/evaluate", json={"images": x[i:i + 1000].tolist(), "labels": y[i:i + 1000].tolist()})
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["model_version"] == lenet_version[2] and a["n"] == 1000
        correct += sum(a["confusion_matrix"][k][k] for k in range(10))
        n += a["n"]
        assert a["offline_test_accuracy"] == manifest["test_accuracy"]
    assert n == 10_000
    assert abs(correct - round(manifest["test_accuracy"] * 10_000)) <= 5


def test_predict_labels_match_evaluate_on_the_same_images(server, test_set, lenet_version):
    x, y = test_set[0][:1000], test_set[1][:1000]
    p = post(server, "/predict", json={"images": x.tolist()})
    assert p.status_code == 200, p.text
    body = p.json()
    assert body["model_version"] == lenet_version[2] and len(body["predictions"]) == 1000
    labels = np.array([q["label"] for q in body["predictions"]])
    e = post(server, "/evaluate", json={"images": x.tolist(), "labels": y.tolist()}).json()
    assert e["accuracy"] == float((labels == y).mean())
    first = body["predictions"][0]
    assert set(first) == {"label", "class_name", "probability", "top_k"}
    assert set(first["top_k"][0]) == {"label", "class_name", "probability"}
    # the binary route gives the same answer as the JSON route
    n = post(server, "/evaluate_npz", files={"file": ("t.npz", npz_bytes(images=x, labels=y), "application/octet-stream")})
    assert n.status_code == 200, n.text
    assert n.json()["confusion_matrix"] == e["confusion_matrix"]
    assert {"accuracy_ci95", "consistent_with_offline", "consistency_test", "per_class"} <= set(e)


def test_predict_image_matches_predict(server, test_set):
    x = test_set[0][:3]
    for image in x:
        r = post(server, "/predict_image", files={"file": ("x.png", png_bytes(image), "image/png")})
        assert r.status_code == 200, r.text
        j = post(server, "/predict", json={"images": [image.tolist()]}).json()
        assert r.json() == j
    r = post(server, "/predict_image", files={"file": ("x.jpg", png_bytes(np.full((90, 60, 3), 128, np.uint8), "JPEG"),
                                                       "image/jpeg")})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


def test_model_info(server, lenet_version):
    r = post(server, "/model_info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["name"] == "lenet" and info["model_version"] == lenet_version[2]
    assert info["classes"][0] == "T-shirt/top" and info["input"]["height"] == 28
    assert info["offline_metrics"]["test_accuracy"] == lenet_version[3]["test_accuracy"]
    assert info["created_at"] and info["limits"]["max_images"] >= 1
    assert httpx.get(server.url + "/model_info").json() == info  # GET reads the same answer
    assert httpx.get(server.url + "/docs.json").status_code == 200


# ------------------------------------------------------------------------------------------
# bad input: every request a 4xx with a message; the server keeps serving


def _json(obj) -> tuple[str, dict]:
    return "json", {"content": json.dumps(obj).encode(), "headers": {"content-type": "application/json"}}


def _raw(body: bytes, ctype: str | None = "application/json") -> tuple[str, dict]:
    return "raw", {"content": body, "headers": {"content-type": ctype} if ctype else {}}


def _file(data: bytes, name: str = "f", ctype: str = "application/octet-stream", field: str = "file"):
    return "file", {"files": {field: (name, data, ctype)}}


def _pixel(v) -> list:
    image = [row[:] for row in IMG]
    image[3][7] = v
    return [image]


_deep = "[" * 5000 + "]" * 5000
_obj_npz = npz_bytes(images=np.zeros((1, 28, 28), np.uint8), labels=np.array([{"x": 1}], dtype=object))

MALFORMED = [
    # (route, request, expected status)
    ("/predict", _raw(b'{"images": [[0, 1'), 400),                        # invalid JSON
    ("/predict", _raw(b""), 400),                                          # empty body
    ("/predict", _json({}), 400),                                          # missing field
    ("/predict", _json({"images": None}), 400),                            # null field
    ("/predict", _json({"images": "pixels"}), 400),                        # wrong type
    ("/predict", _json([IMG]), 400),                                       # body is a list, not an object
    ("/predict", _json({"images": []}), 400),                              # empty batch
    ("/predict", _json({"images": IMG}), 400),                             # one image, not a batch
    ("/predict", _json({"images": [IMG[:27]]}), 400),                      # wrong shape 27x28
    ("/predict", _json({"images": [[r[:14] for r in IMG]]}), 400),         # wrong shape 28x14
    ("/predict", _json({"images": [IMG[:5] + [[0] * 27] + IMG[6:]]}), 400),  # ragged row
    ("/predict", _json({"images": [[IMG, IMG, IMG]]}), 400),               # 3 channels for a grey model
    ("/predict", _json({"images": _pixel("12")}), 400),                    # string pixel
    ("/predict", _json({"images": _pixel(True)}), 400),                    # boolean pixel
    ("/predict", _json({"images": _pixel(None)}), 400),                    # null pixel
    ("/predict", _json({"images": _pixel({"v": 1})}), 400),                # object pixel
    ("/predict", _json({"images": _pixel(256)}), 400),                     # above 255
    ("/predict", _json({"images": _pixel(-3)}), 400),                      # below 0
    ("/predict", _json({"images": _pixel(2**70)}), 400),                   # beyond 64 bits
    ("/predict", _json({"images": _pixel(0.5)}), 400),                     # fractional
    ("/predict", _raw(json.dumps({"images": _pixel(0)}).replace("0", "NaN", 1).encode()), 400),       # NaN
    ("/predict", _raw(json.dumps({"images": _pixel(0)}).replace("0", "-Infinity", 1).encode()), 400),  # -Infinity
    ("/predict", _raw(b'{"images": 1e999}'), 400),                         # Infinity as the field
    ("/predict", _raw(('{"images": ' + _deep + "}").encode()), 400),       # absurd nesting
    ("/predict", _json({"images": [[[[[[[[1]]]]]]]]}), 400),               # nested too deep
    ("/predict", _json({"images": [IMG], "top_k": 0}), 400),               # top_k out of range
    ("/predict", _json({"images": [IMG], "top_k": "three"}), 400),         # top_k not a number
    ("/predict", _json({"images": [IMG] * 1025}), 413),                    # over MAX_IMAGES (1024)
    ("/predict", _raw(b"\x80\x04K\x01.", "application/vnd.bentoml+pickle"), 415),  # pickle
    ("/predict", _raw(b"\x80\x04K\x01.", "application/python-pickle"), 415),       # pickle, other name
    ("/predict", _raw(b'{"images": []}', "application/x-www-form-urlencoded"), 415),  # curl -d without -H
    ("/predict", _raw(b"1,2,3", "text/csv"), 415),
    ("/evaluate", _json({"images": [IMG]}), 400),                          # labels missing
    ("/evaluate", _json({"images": [IMG], "labels": None}), 400),          # labels null
    ("/evaluate", _json({"images": [IMG], "labels": [10]}), 400),          # label out of range
    ("/evaluate", _json({"images": [IMG], "labels": [-1]}), 400),          # negative label
    ("/evaluate", _json({"images": [IMG], "labels": [1.5]}), 400),         # non-integer label
    ("/evaluate", _json({"images": [IMG], "labels": ["3"]}), 400),         # string label
    ("/evaluate", _json({"images": [IMG], "labels": [True]}), 400),        # boolean label
    ("/evaluate", _json({"images": [IMG, IMG], "labels": [1]}), 400),      # count mismatch
    ("/evaluate", _json({"images": [IMG], "labels": 3}), 400),             # labels not a list
    ("/predict_image", _file(b"this is text, not a picture", "a.png", "image/png"), 400),  # no image
    ("/predict_image", _file(b"", "a.png", "image/png"), 400),             # empty file
    ("/predict_image", _file(png_bytes(np.zeros((28, 28), np.uint8), "GIF"), "a.gif", "image/gif"), 415),
    ("/predict_image", _file(png_bytes(np.zeros((28, 28), np.uint8)), field="image"), 400),  # wrong field name
    ("/predict_image", _json({"file": "https://example.com/x.png"}), 415),  # a URL is not an upload
    ("/predict_image", ("file", {"files": {"file": (None, b"https://example.com/x.png")}}), 400),  # URL as text
    ("/predict_image", _raw(b"--xx\r\nbroken", "multipart/form-data; boundary=xx"), 400),  # malformed multipart
    ("/predict_image", _raw(b"abc", "multipart/form-data"), 400),        # multipart without a boundary
    ("/evaluate_npz", _file(b"\x80\x04K\x01."), 400),                      # a pickle, not an npz
    ("/evaluate_npz", _file(_obj_npz), 400),                               # object array (pickle inside)
    ("/evaluate_npz", _file(npz_bytes(images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, int))), 400),
    ("/evaluate_npz", _file(npz_bytes(images=np.zeros((2, 28, 28), np.uint8))), 400),  # no labels
    ("/evaluate_npz", _file(b"PK\x03\x04 truncated zip"), 400),
    ("/evaluate_npz", _raw(b"\x80\x04K\x01.", "application/octet-stream"), 415),  # raw bytes, not multipart
]


def test_malformed_corpus_is_refused_and_the_server_keeps_serving(server):
    assert len(MALFORMED) >= 25
    failures = []
    for i, (route, (kind, kw), status) in enumerate(MALFORMED):
        try:
            r = httpx.post(server.url + route, timeout=60, **kw)
        except httpx.HTTPError as e:  # a dropped connection is a failure too
            failures.append(f"#{i} {route}: {type(e).__name__} {e}")
            continue
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        message = body.get("error") if isinstance(body, dict) else None
        if r.status_code != status or not message:
            failures.append(f"#{i} {route}: {r.status_code} (expected {status}) {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert httpx.get(server.url + "/readyz").status_code == 200
    r = post(server, "/predict", json={"images": [IMG]})
    assert r.status_code == 200 and r.json()["predictions"][0]["class_name"]


def test_messages_say_what_is_wrong(server):
    def error(payload) -> str:
        return post(server, "/predict", json=payload).json()["error"]

    assert "ragged" in error({"images": [IMG[:5] + [[0] * 27] + IMG[6:]]})
    assert "images[0][3][7]" in error({"images": _pixel("12")}) and "string" in error({"images": _pixel("12")})
    assert "boolean" in error({"images": _pixel(True)})
    assert "0..255" in error({"images": _pixel(256)})
    assert "3 channels" in error({"images": [[IMG, IMG, IMG]]})
    assert "1024" in error({"images": [IMG] * 1025})
    r = post(server, "/evaluate", json={"images": [IMG, IMG], "labels": [1]})
    assert "2 images" in r.json()["error"]


# ------------------------------------------------------------------------------------------
# two workers: metrics, and the body-size limit


def _samples(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric in Prometheus text format."""
    out = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def two_workers(lenet_version, tmp_path_factory):
    s = start(tmp_path_factory, {**lenet_env(lenet_version), "MAX_BODY_MB": "1"}, workers=2)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_metrics_with_two_workers(two_workers, test_set, lenet_version):
    import concurrent.futures as cf

    s, version = two_workers, lenet_version[2]
    x, y = test_set
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
            assert all(a.status_code == 200 for a in answers), answers[0].text
            n_eval += 4
            if len(pids("gauge_mostrecent")) >= 2:
                break
    assert len(pids("gauge_mostrecent")) >= 2, sorted(p.name for p in prom.iterdir())
    # then one more, on other images: the most recent evaluation wins, whichever worker ran it
    last = post(s, "/evaluate", json={"images": x[100:300].tolist(), "labels": y[100:300].tolist()}).json()["accuracy"]
    for i in range(8):
        assert post(s, "/predict", json={"images": x[i * 5:(i + 1) * 5].tolist()}).status_code == 200
    assert post(s, "/predict", json={"images": []}).status_code == 400

    text = httpx.get(s.url + "/metrics").text
    label = f'{{model_version="{version}"}}'
    acc = _samples(text, "imgclf_evaluation_accuracy")
    assert acc == {label: pytest.approx(last)}, acc  # one series, no per-worker duplicates
    assert _samples(text, "imgclf_offline_test_accuracy") == {label: pytest.approx(lenet_version[3]["test_accuracy"])}
    assert _samples(text, "imgclf_model_info") == {f'{{model_name="lenet",model_version="{version}"}}': 1.0}
    assert len(pids("gauge_max")) == 2 and len(pids("gauge_livemax")) == 2  # both workers set these at start
    assert _samples(text, "imgclf_evaluated_samples_total") == {label: 100.0 * n_eval + 200}
    assert sum(_samples(text, "imgclf_predictions_total").values()) == 40.0
    count = _samples(text, "imgclf_inference_latency_seconds_count")
    assert count[f'{{endpoint="/evaluate",model_version="{version}"}}'] == n_eval + 1
    assert count[f'{{endpoint="/predict",model_version="{version}"}}'] == 8
    assert 'imgclf_inference_latency_seconds_bucket{endpoint="/predict",le="0.005",model_version=' in text
    assert _samples(text, "imgclf_batch_size_count")['{endpoint="/evaluate"}'] == n_eval + 1
    rejected = _samples(text, "imgclf_rejected_requests_total")
    assert rejected.get('{endpoint="/predict",reason="empty"}') == 1.0, rejected
    assert "bentoml_service_request_total" in text  # BentoML's own metrics stay


def test_body_over_the_limit_is_413(two_workers):
    big = {"images": [IMG] * 1000}  # ~1.7 MB of JSON, over MAX_BODY_MB=1
    r = post(two_workers, "/predict", json=big)
    assert r.status_code == 413 and "MAX_BODY_MB" in r.json()["error"]

    def chunks():  # no Content-Length: counted while read
        body = json.dumps(big).encode()
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    r = post(two_workers, "/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert post(two_workers, "/predict", json={"images": [IMG]}).status_code == 200


# ------------------------------------------------------------------------------------------
# a tampered version is never served


def test_flipped_byte_never_becomes_ready(lenet_version, tmp_path_factory):
    root, name, version, manifest = lenet_version
    bad_root = tmp_path_factory.mktemp("tampered")
    shutil.copytree(root / name / version, bad_root / name / version)
    weights = bad_root / name / version / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    s = start(tmp_path_factory, {"ARTIFACTS_DIR": str(bad_root), "MODEL_NAME": name, "MODEL_VERSION": version})
    try:
        deadline = time.monotonic() + 90
        r = None
        while time.monotonic() < deadline:
            assert s.proc.poll() is None, s.log()
            try:
                r = httpx.get(s.url + "/readyz", timeout=5)
                if "sha256" in r.text:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert r is not None and r.status_code == 503, r and r.text
        assert "model.safetensors" in r.json()["error"] and manifest["weights_sha256"] in r.json()["error"]
        p = post(s, "/predict", json={"images": [IMG]})
        assert p.status_code == 503 and "sha256" in p.json()["error"]
        time.sleep(3)
        assert httpx.get(s.url + "/readyz").status_code == 503  # still refused, never ready
        log = s.log()
        assert "NOT READY" in log and str(weights) in log and manifest["weights_sha256"] in log, log[-2000:]
    finally:
        s.stop()


@pytest.mark.parametrize("env, words", [
    ({"MODEL_VERSION": "../../etc"}, "invalid version"),            # cannot reach outside ARTIFACTS_DIR
    ({"MODEL_VERSION": "20000101-000000-00000000"}, "no version"),  # unknown version
    ({"DEVICE": "cuda"}, "CUDA"),                                    # asked for a GPU that is not there
])
def test_a_version_that_cannot_load_answers_503_with_the_reason(lenet_version, tmp_path_factory, env, words):
    import torch

    if env.get("DEVICE") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: DEVICE=cuda loads")
    s = start(tmp_path_factory, {**lenet_env(lenet_version), **env})
    try:
        deadline, r = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            assert s.proc.poll() is None, s.log()
            try:
                r = httpx.get(s.url + "/readyz", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert r is not None and r.status_code == 503 and words in r.json()["error"], r and r.text
        assert httpx.get(s.url + "/livez").status_code == 200
    finally:
        s.stop()
