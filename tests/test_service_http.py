"""The HTTP contract against a real `bentoml serve` of a LeNet version (the session's `lenet_server`):
the headline accuracy checks, the answers' shapes, and a corpus of malformed requests.

Metrics with two workers: test_service_metrics.py. Refused versions: test_service_integrity.py.
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest

from bench.harness import Server
from tests.conftest import lenet_env

pytestmark = pytest.mark.slow

IMG = [[0] * 28 for _ in range(28)]


@pytest.fixture(scope="module")
def server(lenet_server):
    return lenet_server


@pytest.fixture(scope="module")
def test_set(fashion):
    return fashion.test_x[:, 0].numpy(), fashion.test_y.numpy()  # (N, 28, 28) uint8, (N,)


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


def test_evaluate_full_test_set_in_json_chunks_reproduces_the_manifest_and_the_npz_route(server, test_set,
                                                                                          lenet_version):
    x, y = test_set
    _, _, version, manifest = lenet_version
    cm = np.zeros((10, 10), int)
    for i in range(0, 10_000, 1000):
        r = post(server, "/evaluate", json={"images": x[i:i + 1000].tolist(), "labels": y[i:i + 1000].tolist()})
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["model_version"] == version and a["n"] == 1000
        assert a["offline_test_accuracy"] == manifest["test_accuracy"] and a["offline_test_n"] == 10_000
        cm += np.array(a["confusion_matrix"])
    assert cm.sum() == 10_000
    assert abs(int(np.trace(cm)) - round(manifest["test_accuracy"] * 10_000)) <= 5  # the Done-when check
    # the binary route over the same 10,000 gives the same matrix in one upload
    r = post(server, "/evaluate_npz", files={"file": ("test.npz", npz_bytes(images=x, labels=y),
                                                      "application/octet-stream")})
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["model_version"] == version and full["n"] == 10_000
    assert full["confusion_matrix"] == cm.tolist()
    assert full["accuracy"] == pytest.approx(np.trace(cm) / 10_000)
    assert full["consistent_with_offline"] is True


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
    n = post(server, "/evaluate_npz", files={"file": ("t.npz", npz_bytes(images=x, labels=y))})
    assert n.status_code == 200, n.text
    assert n.json()["confusion_matrix"] == e["confusion_matrix"]
    assert e["model_version"] == n.json()["model_version"] == lenet_version[2]
    assert {"accuracy_ci95", "consistent_with_offline", "consistency_test", "per_class"} <= set(e)


def test_predict_image_matches_predict(server, test_set, lenet_version):
    x = test_set[0][:3]
    for image in x:
        r = post(server, "/predict_image", files={"file": ("x.png", png_bytes(image), "image/png")})
        assert r.status_code == 200, r.text
        j = post(server, "/predict", json={"images": [image.tolist()]}).json()
        assert r.json()["predictions"][0]["label"] == j["predictions"][0]["label"]
        assert r.json() == j and j["model_version"] == lenet_version[2]
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

_nan = json.dumps({"images": _pixel(0)}).replace("0", "NaN", 1).encode()            # raw JSON with a NaN token
_inf = json.dumps({"images": _pixel(0)}).replace("0", "-Infinity", 1).encode()      # ... and -Infinity
_inf_label = json.dumps({"images": [IMG], "labels": [0]}).replace('"labels": [0]', '"labels": [Infinity]').encode()

# (name, route, request, expected status, a phrase the `error` message must contain); the test id
# is route-name, e.g. `pytest -k predict-pixel-nan`
MALFORMED = [
    # JSON that is no JSON, or not the expected object
    ("invalid-json", "/predict", _raw(b'{"images": [[0, 1'), 400, "Invalid JSON"),
    ("empty-body", "/predict", _raw(b""), 400, "images: Field required"),
    ("empty-object", "/predict", _json({}), 400, "images: Field required"),
    ("images-null", "/predict", _json({"images": None}), 400, "images: Input should be a valid array"),
    ("images-string", "/predict", _json({"images": "pixels"}), 400, "images: Input should be a valid array"),
    ("list-not-object", "/predict", _json([IMG]), 400, "Input should be an object"),
    ("images-infinity", "/predict", _raw(b'{"images": 1e999}'), 400, "valid array"),  # Infinity as the field
    ("absurd-nesting", "/predict", _raw(('{"images": ' + _deep + "}").encode()), 400, "recursion limit"),
    # batches of the wrong size or shape
    ("empty-batch", "/predict", _json({"images": []}), 400, "is empty"),
    ("one-image-not-a-batch", "/predict", _json({"images": IMG}), 400, "must be 28x28"),
    ("image-27-rows", "/predict", _json({"images": [IMG[:27]]}), 400, "got 1x27x28"),
    ("image-14-columns", "/predict", _json({"images": [[r[:14] for r in IMG]]}), 400, "got 1x28x14"),
    ("ragged-row", "/predict", _json({"images": [IMG[:5] + [[0] * 27] + IMG[6:]]}), 400, "ragged"),
    ("ragged-images", "/predict", _json({"images": [IMG, IMG[:20]]}), 400, "images[1]"),
    ("three-channels", "/predict", _json({"images": [[IMG, IMG, IMG]]}), 400, "3 channels; this model takes 1"),
    ("too-deeply-nested", "/predict", _json({"images": [[[[[[[[1]]]]]]]]}), 400, "nested"),
    ("over-max-images", "/predict", _json({"images": [IMG] * 1025}), 413, "the limit is 1024 (MAX_IMAGES)"),
    # pixels that are not numbers 0..255
    ("pixel-string", "/predict", _json({"images": _pixel("12")}), 400, "images[0][3][7] is a string"),
    ("pixel-true", "/predict", _json({"images": _pixel(True)}), 400, "images[0][3][7] is a boolean"),
    ("pixels-false", "/predict", _json({"images": [[[False] * 28] * 28]}), 400, "boolean"),
    ("pixel-null", "/predict", _json({"images": _pixel(None)}), 400, "images[0][3][7] is a null"),
    ("pixel-object", "/predict", _json({"images": _pixel({"v": 1})}), 400, "images[0][3][7] is a object"),
    ("pixel-256", "/predict", _json({"images": _pixel(256)}), 400, "0..255; got values from 0 to 256"),
    ("pixel-negative", "/predict", _json({"images": _pixel(-3)}), 400, "0..255; got values from -3"),
    ("pixel-2-to-the-70", "/predict", _json({"images": _pixel(2**70)}), 400, "far outside 0..255"),
    ("pixel-fraction", "/predict", _json({"images": _pixel(0.5)}), 400, "whole numbers"),
    ("pixel-nan", "/predict", _raw(_nan), 400, "NaN or Infinity"),
    ("pixel-minus-infinity", "/predict", _raw(_inf), 400, "NaN or Infinity"),
    # other fields
    ("top-k-zero", "/predict", _json({"images": [IMG], "top_k": 0}), 400, "top_k must be an integer 1..10"),
    ("top-k-string", "/predict", _json({"images": [IMG], "top_k": "three"}), 400, "top_k"),
    # content types the JSON routes do not take
    ("python-pickle", "/predict", _raw(b"\x80\x04K\x01.", "application/python-pickle"), 415,
     "unsupported content type"),
    ("bentoml-pickle", "/predict", _raw(b"\x80\x04K\x01.", "application/vnd.bentoml+pickle"), 415,
     "takes application/json"),
    ("text-plain", "/predict", _raw(b'{"images": []}', "text/plain"), 415, "'text/plain'"),
    ("form-urlencoded", "/predict", _raw(b'{"images": []}', "application/x-www-form-urlencoded"), 415,
     "takes application/json"),
    ("csv", "/evaluate", _raw(b"1,2,3", "text/csv"), 415, "'text/csv'"),
    ("python-pickle", "/evaluate", _raw(b"\x80\x04K\x01.", "application/python-pickle"), 415,
     "unsupported content type"),
    # labels
    ("labels-missing", "/evaluate", _json({"images": [IMG]}), 400, "labels: Field required"),
    ("labels-null", "/evaluate", _json({"images": [IMG], "labels": None}), 400,
     "labels: Input should be a valid array"),
    ("labels-number", "/evaluate", _json({"images": [IMG], "labels": 3}), 400,
     "labels: Input should be a valid array"),
    ("images-missing", "/evaluate", _json({"labels": [1]}), 400, "images: Field required"),
    ("label-10", "/evaluate", _json({"images": [IMG], "labels": [10]}), 400, "labels[0] = 10 is out of range"),
    ("label-negative", "/evaluate", _json({"images": [IMG], "labels": [-1]}), 400,
     "labels[0] = -1 is out of range"),
    ("label-fraction", "/evaluate", _json({"images": [IMG], "labels": [1.5]}), 400, "labels must be integer"),
    ("label-string", "/evaluate", _json({"images": [IMG], "labels": ["3"]}), 400, "labels[0] is '3' (string)"),
    ("label-true", "/evaluate", _json({"images": [IMG], "labels": [True]}), 400, "(boolean)"),
    ("label-infinity", "/evaluate", _raw(_inf_label), 400, "labels must be integer"),
    ("fewer-labels", "/evaluate", _json({"images": [IMG, IMG], "labels": [1]}), 400, "1 labels for 2 images"),
    ("more-labels", "/evaluate", _json({"images": [IMG], "labels": [1, 2]}), 400, "2 labels for 1 images"),
    # image files
    ("text-as-png", "/predict_image", _file(b"this is text, not a picture", "a.png", "image/png"), 400,
     "not a readable PNG or JPEG"),
    ("truncated-png", "/predict_image", _file(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "a.png", "image/png"), 400,
     "not a readable PNG"),
    ("empty-file", "/predict_image", _file(b"", "a.png", "image/png"), 400, "empty"),
    ("gif", "/predict_image", _file(png_bytes(np.zeros((28, 28), np.uint8), "GIF"), "a.gif", "image/gif"), 415,
     "GIF image; send PNG or JPEG"),
    ("wrong-field", "/predict_image", _file(png_bytes(np.zeros((28, 28), np.uint8)), field="image"), 400,
     "field 'image'"),
    ("url-as-json", "/predict_image", _json({"file": "https://example.com/x.png"}), 415, "multipart/form-data"),
    ("url-as-form-text", "/predict_image", ("file", {"files": {"file": (None, b"https://example.com/x.png")}}), 400,
     "not text"),
    ("multipart-without-file", "/predict_image", _raw(b"--xx\r\nbroken", "multipart/form-data; boundary=xx"), 400,
     "no file in field"),
    ("multipart-without-boundary", "/predict_image", _raw(b"abc", "multipart/form-data"), 400, "malformed multipart"),
    ("python-pickle", "/predict_image", _raw(b"\x80\x04K\x01.", "application/python-pickle"), 415,
     "unsupported content type"),
    # .npz uploads
    ("pickle", "/evaluate_npz", _file(b"\x80\x04K\x01."), 400, "not a zip archive"),
    ("object-array", "/evaluate_npz", _file(_obj_npz), 400, "never unpickles"),
    ("float-images", "/evaluate_npz",
     _file(npz_bytes(images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, int))), 400, "send uint8"),
    ("labels-missing", "/evaluate_npz", _file(npz_bytes(images=np.zeros((2, 28, 28), np.uint8))), 400, "needs arrays"),
    ("four-dimensional-images", "/evaluate_npz",
     _file(npz_bytes(images=np.zeros((2, 3, 28, 28), np.uint8), labels=np.zeros(2, int))), 400, "expected (N, 28, 28)"),
    ("label-10", "/evaluate_npz",
     _file(npz_bytes(images=np.zeros((2, 28, 28), np.uint8), labels=np.array([0, 10]))), 400, "out of range"),
    ("more-labels", "/evaluate_npz",
     _file(npz_bytes(images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(3, int))), 400, "3 labels for 2 images"),
    ("truncated-zip", "/evaluate_npz", _file(b"PK\x03\x04 truncated zip"), 400, "not a readable .npz"),
    ("raw-body-not-multipart", "/evaluate_npz", _raw(b"\x80\x04K\x01.", "application/octet-stream"), 415,
     "multipart/form-data"),
]


def test_malformed_corpus_has_at_least_25_requests():
    assert len(MALFORMED) >= 25


@pytest.mark.parametrize("route, sent, status, phrase", [
    pytest.param(route, sent, status, phrase, id=f"{route.strip('/')}-{name}")
    for name, route, sent, status, phrase in MALFORMED])
def test_malformed_request_is_refused_and_the_server_keeps_serving(server, route, sent, status, phrase):
    _, kw = sent
    r = httpx.post(server.url + route, timeout=60, **kw)  # a dropped connection fails the case too
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
    message = body.get("error") if isinstance(body, dict) else None
    assert r.status_code == status and isinstance(message, str) and phrase in message, \
        f"{r.status_code} (expected {status} with {phrase!r}) {r.text[:300]}"
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.get(server.url + "/livez").status_code == 200
    r = post(server, "/predict", json={"images": [IMG]})
    assert r.status_code == 200 and r.json()["predictions"][0]["class_name"]


def test_body_over_the_size_limit_is_413(lenet_version):
    """MAX_BODY_MB=0.01 (10 KiB): a larger body is refused whether it says its length or is sent in chunks."""
    with Server({**lenet_env(lenet_version), "MAX_BODY_MB": "0.01"}) as s:
        big = {"images": [IMG] * 10}  # ~16 KB of JSON
        r = post(s, "/predict", json=big)
        assert r.status_code == 413, r.text
        assert "over the limit of 10485 bytes (MAX_BODY_MB)" in r.json()["error"]

        def chunks():  # no Content-Length: counted while read
            body = json.dumps(big).encode()
            for i in range(0, len(body), 4096):
                yield body[i:i + 4096]

        r = post(s, "/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "MAX_BODY_MB" in r.json()["error"]
        r = post(s, "/evaluate_npz", files={"file": ("t.npz", npz_bytes(images=np.zeros((30, 28, 28), np.uint8),
                                                                         labels=np.zeros(30, int)))})
        assert r.status_code == 413 and "MAX_BODY_MB" in r.json()["error"]
        # and then it serves as before
        assert httpx.get(s.url + "/readyz").status_code == 200
        r = post(s, "/predict", json={"images": [IMG]})
        assert r.status_code == 200 and r.json()["predictions"]


def test_refusals_name_their_reason_and_version(server, lenet_version):
    """A refusal by the model's own checks names the version and a fixed reason (also as a header);
    a refusal by BentoML's request parsing keeps pydantic's `detail` and says what is expected."""
    r = post(server, "/predict", json={"images": [IMG[:27]]})
    assert r.status_code == 400
    assert r.json()["model_version"] == lenet_version[2] and r.json()["reason"] == "shape"
    assert r.headers["x-imgclf-reason"] == "shape"
    r = post(server, "/evaluate", json={"images": [IMG]})
    body = r.json()
    assert r.status_code == 400 and body["reason"] == "validation"
    assert body["detail"][0]["loc"] == ["labels"] and '"labels": [an integer class index per image]' in body["error"]
    r = post(server, "/predict", content=b"\x80\x04K\x01.", headers={"content-type": "application/python-pickle"})
    assert r.status_code == 415 and r.headers["x-imgclf-reason"] == "content_type"


def test_top_k_is_strict_on_every_route(server):
    """top_k is a JSON integer 1..10 whichever way a request comes in: the JSON body of /predict (the guard's
    fast path) and the form field of /predict_image (BentoML's route, which reads form values as JSON)."""
    png = png_bytes(np.zeros((28, 28), np.uint8))
    for top_k in ("3", True, 3.0, None, 0, 11):
        r = post(server, "/predict", json={"images": [IMG], "top_k": top_k})
        assert r.status_code == 400 and r.json()["reason"] == "top_k", (top_k, r.text)
        assert r.json()["error"].startswith("top_k must be an integer 1..10, got "), r.text
    for form in ('"3"', "true", "3.0", "0", "three"):
        r = post(server, "/predict_image", files={"file": ("x.png", png, "image/png")}, data={"top_k": form})
        assert r.status_code == 400 and r.json()["reason"] == "top_k", (form, r.text)
    r = post(server, "/predict", json={"images": [IMG], "top_k": 2})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 2
    r = post(server, "/predict_image", files={"file": ("x.png", png, "image/png")}, data={"top_k": "2"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 2


def test_a_refused_request_is_one_warning_line_without_a_traceback(server):
    """Refusals by BentoML's parsing (pydantic), by the model's checks and by the guard itself: each one
    WARNING line naming the route and the reason. BentoML's own ERROR line with a traceback is silenced."""
    import time

    cases = [("/evaluate", {"json": {"images": [IMG]}}, "400 validation"),                 # pydantic, BentoML's route
             ("/predict", {"content": b'{"images": [[0, 1'}, "400 validation"),            # invalid JSON
             ("/predict", {"json": {"images": [IMG[:27]]}}, "400 shape"),                  # the model's check
             ("/predict", {"content": b"{}", "headers": {"content-type": "text/plain"}}, "415 content_type"),
             ("/evaluate_npz", {"files": {"file": ("t.npz", b"no zip")}}, "400 format")]
    for route, kw, status_reason in cases:
        start = len(server.log())
        r = post(server, route, **kw)
        assert f"{r.status_code} {r.json()['reason']}" == status_reason, r.text
        deadline, new = time.monotonic() + 10, ""
        while "refused" not in new and time.monotonic() < deadline:
            time.sleep(0.1)
            new = server.log()[start:]
        lines = [line for line in new.splitlines() if line.strip()]
        assert len(lines) == 1, new
        assert "[WARNING]" in lines[0] and f"refused POST {route}: {status_reason}: " in lines[0], lines[0]
        assert "Traceback" not in new and "[ERROR]" not in new, new
