"""Interop: BACKEND=onnx vs torch (service/backends.py), the Open Inference Protocol v2 (service/v2.py) driven
by the official tritonclient, and BentoML's own SyncHTTPClient, against real servers of the session's LeNet."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bench.harness import Server
from core import artifacts
from core.artifacts import IntegrityError
from service import backends, v2
from service.inference import Classifier, InputError
from service.settings import Settings, SettingsError
from tests.conftest import StartAhead, lenet_env

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def test_set(fashion):
    return fashion.test_x[:, 0].numpy(), fashion.test_y.numpy()  # (N, 28, 28) uint8, (N,)


@pytest.fixture(scope="module")
def onnx_server(lenet_server):
    """The session's server: BACKEND unset, so auto, which is onnx on the CPU (checked in the test)."""
    return lenet_server


@pytest.fixture(scope="module")
def own_servers(lenet_version, tmp_path_factory):
    """The module's own servers, started side by side (start-up is the slow part): "torch" (BACKEND=torch,
    MAX_BODY_MB=8) and "no_onnx" (BACKEND=onnx of a copy of the version without model.onnx: never ready)."""
    root, version = without_onnx(lenet_version, tmp_path_factory.mktemp("without-onnx"))
    no_onnx = {"ARTIFACTS_DIR": str(root), "MODEL_NAME": "lenet", "MODEL_VERSION": version, "BACKEND": "onnx"}
    v2_live = lambda url: httpx.get(url + "/v2/health/live", timeout=2).status_code == 200  # noqa: E731
    with StartAhead({"torch": lambda: Server({**lenet_env(lenet_version), "BACKEND": "torch", "MAX_BODY_MB": "8"}),
                     "no_onnx": lambda: Server(no_onnx, probe=v2_live)}) as servers:
        yield servers


@pytest.fixture(scope="module")
def torch_server(own_servers):
    server = own_servers.take("torch")
    server.wait_ready()
    return server


def without_onnx(lenet_version, root: Path) -> tuple[Path, str]:
    """A copy of the session's version as versions published before model.onnx existed: no file, no entry."""
    src_root, name, version, _ = lenet_version
    dst = root / name / version
    shutil.copytree(Path(src_root) / name / version, dst)
    (dst / "model.onnx").unlink()
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["onnx"], manifest["files"]["model.onnx"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return root, version


# ------------------------------------------------------------------------------------------
# BACKEND: the choice, the refusals, and identical answers on real servers


def test_backend_setting_is_parsed():
    assert Settings.from_env({}).backend == "auto"
    assert Settings.from_env({"BACKEND": "onnx"}).backend == "onnx"
    with pytest.raises(SettingsError, match="BACKEND must be auto, torch or onnx, got 'tensorrt'"):
        Settings.from_env({"BACKEND": "tensorrt"})


def test_backend_choice(lenet_version, tmp_path):
    m = artifacts.load(*lenet_version[:3]).manifest
    old = artifacts.read_manifest(Path(without_onnx(lenet_version, tmp_path)[0]) / "lenet" / lenet_version[2])
    cpu_only = ["CPUExecutionProvider"]
    assert backends.choose("auto", m, CPU, cpu_only)[0] == "onnx"
    assert backends.choose("auto", old, CPU, cpu_only)[0] == "torch"  # falls back: auto promises nothing more
    assert backends.choose("auto", m, GPU, cpu_only)[0] == "torch"
    assert backends.choose("auto", m, CPU, None)[0] == "torch"
    assert backends.choose("torch", m, CPU, cpu_only)[0] == "torch"
    assert backends.choose("onnx", m, GPU, ["CUDAExecutionProvider", *cpu_only])[0] == "onnx"
    with pytest.raises(backends.BackendError, match="has no model.onnx .* BACKEND=torch or BACKEND=auto"):
        backends.choose("onnx", old, CPU, cpu_only)
    with pytest.raises(backends.BackendError, match="needs onnxruntime-gpu"):
        backends.choose("onnx", m, GPU, cpu_only)
    with pytest.raises(backends.BackendError, match="needs onnxruntime, which is not installed"):
        backends.choose("onnx", m, CPU, None)


def test_onnx_runner_refuses_a_model_onnx_changed_after_verification(lenet_version, tmp_path):
    src_root, name, version, _ = lenet_version
    shutil.copytree(Path(src_root) / name / version, tmp_path / name / version)
    loaded = artifacts.load(tmp_path, name, version)
    assert Classifier(loaded, CPU, "onnx").backend == "onnx"
    with open(tmp_path / name / version / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="model.onnx: sha256 does not match"):
        Classifier(loaded, CPU, "onnx")


def test_backends_answer_alike_in_process(lenet_version, test_set):
    loaded = artifacts.load(*lenet_version[:3])
    x = test_set[0][:, None]
    t, o = Classifier(loaded, CPU, "torch"), Classifier(loaded, CPU, "onnx")
    pt, po = t.probabilities(x), o.probabilities(x)
    assert (t.backend, o.backend) == ("torch", "onnx")
    assert torch.equal(pt.argmax(1), po.argmax(1)) and (pt - po).abs().max() < 1e-5


@pytest.mark.slow
def test_onnx_and_torch_servers_give_the_same_answers(onnx_server, torch_server, test_set):
    x, y = test_set[0][:1000].tolist(), test_set[1][:1000].tolist()
    info = {s: httpx.get(s.url + "/model_info", timeout=60).json() for s in (onnx_server, torch_server)}
    assert info[onnx_server]["backend"] == "onnx" and info[torch_server]["backend"] == "torch"
    answers = [httpx.post(s.url + "/predict", json={"images": x, "top_k": 10}, timeout=120) for s in
               (onnx_server, torch_server)]
    assert [a.status_code for a in answers] == [200, 200]
    (o, t) = [[p["top_k"] for p in a.json()["predictions"]] for a in answers]
    assert [r[0]["label"] for r in o] == [r[0]["label"] for r in t]
    po = np.array([[q["probability"] for q in sorted(r, key=lambda q: q["label"])] for r in o])
    pt = np.array([[q["probability"] for q in sorted(r, key=lambda q: q["label"])] for r in t])
    assert np.abs(po - pt).max() < 1e-5
    ev = [httpx.post(s.url + "/evaluate", json={"images": x, "labels": y}, timeout=120) for s in
          (onnx_server, torch_server)]
    assert [e.status_code for e in ev] == [200, 200]
    assert ev[0].json() == ev[1].json()  # the same figures, to the last count and p-value


@pytest.mark.slow
def test_onnx_backend_refuses_a_version_without_model_onnx(own_servers):
    """BACKEND=onnx is an explicit choice: an old version is not served by torch behind the operator's back."""
    with own_servers.take("no_onnx") as s:  # ready when /v2/health/live answers 200
        r = httpx.get(s.url + "/readyz", timeout=10)
        assert r.status_code == 503 and "BACKEND=onnx, but lenet/" in r.json()["error"], r.text
        assert "has no model.onnx" in r.json()["error"]
        r = httpx.get(s.url + "/v2/health/ready", timeout=10)
        assert r.status_code == 503 and r.json()["ready"] is False and "has no model.onnx" in r.json()["error"]
        assert httpx.post(s.url + "/v2/models/lenet/infer", json={}, timeout=10).status_code == 503


# ------------------------------------------------------------------------------------------
# the Open Inference Protocol v2, with the official client


@pytest.mark.slow
def test_tritonclient_gets_the_argmax_of_predict(onnx_server, test_set):
    x = test_set[0][:64]
    client = triton.InferenceServerClient(onnx_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lenet")
    meta = client.get_model_metadata("lenet")
    info = httpx.get(onnx_server.url + "/model_info", timeout=60).json()
    assert meta["versions"] == [info["model_version"]] and meta["parameters"]["classes"] == info["classes"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    predicted = [p["label"] for p in httpx.post(onnx_server.url + "/predict", json={"images": x.tolist()},
                                                timeout=60).json()["predictions"]]
    for images, binary in ((x, True), (x[:, None], False)):  # [N, 28, 28] binary, [N, 1, 28, 28] JSON data
        tensor = triton.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        out = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer("lenet", [tensor], outputs=[out], request_id="r1")
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and probs.shape == (64, 10)
        assert probs.argmax(1).tolist() == predicted and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert result.get_response()["id"] == "r1" and result.get_response()["model_version"] == meta["versions"][0]
    with pytest.raises(InferenceServerException, match="unknown model 'resnet'") as e:
        client.get_model_metadata("resnet")
    assert e.value.status() == "404"


def _infer(server, body=None, path="/v2/models/lenet/infer", **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **({"json": body} if body is not None else {}), **kw)


def _tensor(shape, data, datatype="UINT8", name="images") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


IMG = [0] * 784
BINARY_HEADER = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
                                        "parameters": {"binary_data_size": 784}}]}).encode()

V2_REFUSALS = [  # (request kwargs, status, words of the message)
    ({"body": _tensor([1, 28, 28], IMG, datatype="FP32")}, 400, "datatype 'FP32'; send UINT8"),
    ({"body": _tensor([1, 3, 28, 28], IMG * 3)}, 400, "expected [N, 1, 28, 28] or [N, 28, 28]"),
    ({"body": _tensor([1, 28, 27], IMG[:756])}, 400, "has shape [1, 28, 27]"),
    ({"body": _tensor([2, 28, 28], IMG)}, 400, "'data' holds 784 values; shape [2, 28, 28] needs 1568"),
    ({"body": _tensor([1, 28, 28], [256] + IMG[1:])}, 400, "pixel values must be in 0..255"),
    ({"body": _tensor([1, 28, 28], [1.5] + IMG[1:])}, 400, "fractional values"),
    ({"body": _tensor([1, 28, 28], ["a"] + IMG[1:])}, 400, "is a string"),
    ({"body": _tensor([1, 28, 28], [[[0] * 28] * 27])}, 400, "must be 28x28 pixels; got 1x27x28"),
    ({"body": _tensor([1, 28, 28], [[[0] * 28] * 27 + [[0] * 27]])}, 400, "27 entries where 28 were expected"),
    ({"body": _tensor([2, 28, 28], [[[0] * 28] * 28])}, 400, "'data' holds 1 images; shape [2, 28, 28] says 2"),
    ({"body": _tensor([0, 28, 28], [])}, 400, "no images (N = 0)"),
    ({"body": _tensor([1025, 28, 28], [])}, 413, "the limit is 1024 (MAX_IMAGES)"),
    ({"body": _tensor([1, 28, 28], IMG, name="pixels")}, 400, "unknown input 'pixels'"),
    ({"body": {"inputs": []}}, 400, "one tensor named 'images'"),
    ({"body": {**_tensor([1, 28, 28], IMG), "outputs": [{"name": "logits"}]}}, 400, "one output 'probabilities'"),
    ({"body": {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28]}]}}, 400, "needs 'data'"),
    ({"content": b"{not json"}, 400, "not valid JSON"),
    ({"content": b"NaN", "headers": {"content-type": "application/json"}}, 400, "one tensor named 'images'"),
    ({"content": b"x" * 10, "headers": {"content-type": "text/plain"}}, 415, "unsupported content type 'text/plain'"),
    ({"content": b"{}" + b"\0" * 10, "headers": {"inference-header-content-length": "99"}}, 400,
     "Inference-Header-Content-Length '99' must be a whole number 0..12"),
    ({"content": BINARY_HEADER + b"\0" * 783, "headers": {"inference-header-content-length": str(len(BINARY_HEADER))}},
     400, "binary tensor data of 783 bytes"),
    ({"body": _tensor([1, 28, 28], IMG), "path": "/v2/models/resnet/infer"}, 404, "unknown model 'resnet'"),
    ({"body": _tensor([1, 28, 28], IMG), "path": "/v2/models/lenet/versions/1/infer"}, 404,
     "unknown model 'lenet version 1'"),
    ({"body": _tensor([1, 28, 28], IMG), "path": "/v2/models/lenet/explain"}, 404, "no route"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kw,status,words", V2_REFUSALS, ids=[w for _, _, w in V2_REFUSALS])
def test_v2_refusals_are_4xx_in_the_protocol_error_format(onnx_server, kw, status, words):
    r = _infer(onnx_server, **kw)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"], r.text


@pytest.mark.slow
def test_v2_other_refusals_and_the_server_keeps_serving(torch_server):
    body = json.dumps(_tensor([1, 28, 28], IMG)).encode()
    r = _infer(torch_server, content=body + b" " * (8 * 2**20))  # over MAX_BODY_MB=8
    assert r.status_code == 413 and "MAX_BODY_MB" in r.json()["error"]
    assert httpx.get(torch_server.url + "/v2/models/lenet/infer", timeout=10).status_code == 405
    assert httpx.post(torch_server.url + "/v2/health/live", timeout=10).status_code == 405
    r = httpx.get(torch_server.url + "/v2/repository/index", timeout=10)
    assert r.status_code == 404 and "/v2/models/{name}/infer" in r.json()["error"]
    metrics = httpx.get(torch_server.url + "/metrics", timeout=10).text.splitlines()
    assert any(line.startswith("imgclf_rejected_requests_total{") and 'endpoint="/v2/models/{name}/infer"' in line
               and 'reason="too_large"' in line for line in metrics)
    ok = _infer(torch_server, _tensor([1, 28, 28], IMG))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 10]
    assert 'imgclf_batch_size_count{endpoint="/v2/models/{name}/infer"}' in \
        httpx.get(torch_server.url + "/metrics", timeout=10).text


def test_parse_infer_request_nests_flat_data_row_major(lenet_version):
    spec = artifacts.load(*lenet_version[:3]).manifest.input
    img = np.arange(2 * 784).reshape(2, 28, 28) % 256
    flat, nested = _tensor([2, 1, 28, 28], img.ravel().tolist()), _tensor([2, 28, 28], img.tolist())
    for request in (flat, nested):
        x, binary, rid = v2.parse_infer_request(request, b"", spec)
        assert x.shape == (2, 1, 28, 28) and x.dtype == np.uint8 and (x[:, 0] == img).all()
        assert (binary, rid) == (False, None)
    with pytest.raises(InputError, match="'id' must be a string"):
        v2.parse_infer_request({**flat, "id": 3}, b"", spec)
    for odd in ({**flat, "parameters": 7}, {**flat, "outputs": [{"name": "probabilities", "parameters": [1]}]},
                {"inputs": [{**flat["inputs"][0], "parameters": 7}]}):
        with pytest.raises(InputError, match="'parameters' of .* must be an object"):
            v2.parse_infer_request(odd, b"", spec)
    with pytest.raises(InputError, match="not valid JSON"):
        v2.split_body(b"[" * 100_000 + b"]" * 100_000, None)


# ------------------------------------------------------------------------------------------
# BentoML's own client


# the client imports BentoML's build code, whose pathspec warns of its own deprecated pattern class
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_bentoml_sync_http_client_calls_predict_and_evaluate(onnx_server, test_set, tmp_path):
    x, y = test_set[0][:100], test_set[1][:100]
    with bentoml.SyncHTTPClient(onnx_server.url, timeout=120) as client:
        predicted = client.predict(images=x.tolist(), top_k=2)
        evaluated = client.evaluate(images=x.tolist(), labels=y.tolist())
        buf = io.BytesIO()
        np.savez(buf, images=x, labels=y)
        (tmp_path / "test.npz").write_bytes(buf.getvalue())
        uploaded = client.evaluate_npz(file=tmp_path / "test.npz")
        info = client.model_info()
        with pytest.raises(bentoml.exceptions.BentoMLException, match="got 1x27x28") as refused:
            client.predict(images=[[[0] * 28] * 27])
    assert refused.value.error_code == 400 and '"reason":"shape"' in str(refused.value)
    labels = np.array([p["label"] for p in predicted["predictions"]])
    assert len(labels) == 100 and all(len(p["top_k"]) == 2 for p in predicted["predictions"])
    assert evaluated["n"] == 100 and evaluated["accuracy"] == float((labels == y).mean())
    assert uploaded == evaluated
    assert predicted["model_version"] == evaluated["model_version"] == info["model_version"]
