"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP API) beside the service's own API.

    GET  /v2/health/live                 200 {"live": true} while the process answers
    GET  /v2/health/ready                200 {"ready": true} once a model is served, else 503 with the reason
    GET  /v2/models/{name}               the model's metadata, from the manifest
    GET  /v2/models/{name}/ready         200 {"name", "ready": true}
    POST /v2/models/{name}/infer         input `images` UINT8 [N, C, H, W] or [N, H, W] (C = 1) ->
                                         output `probabilities` FP32 [N, K], what /predict ranks
    (each /v2/models/{name}... also as /v2/models/{name}/versions/{version}...)

Tensor data comes as JSON `data` (flat in row-major order, or nested) or, with the protocol's binary
tensor data extension (tritonclient's default), as raw bytes after the JSON header. BentoML routes
take no path parameters, so the guard (service/guard.py) hands every /v2 path to `handle` here. The
checks are /predict's: MAX_BODY_MB, MAX_IMAGES and service.inference.parse_images for every value;
a refusal is a 4xx {"error": "..."} (the protocol's error object), counted in
imgclf_rejected_requests under the route's template, never its raw path. An infer request takes a
place in the service's admission (MAX_CONCURRENCY, service/admission.py) once its body has arrived and
gives it back when its answer is sent (or on any error, disconnect or time-out), like /predict: over the
limit it is a 429 with Retry-After. The health and metadata routes take none.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch

from service import limits, metrics, offload, settings
from service.admission import Admission, Place
from service.inference import Classifier, InputError, parse_images

log = logging.getLogger("imgclf")

INPUT, OUTPUT = "images", "probabilities"
INFER = "/v2/models/{name}/infer"  # the label of the infer route in the metrics and the log
_TAKES = ("", "application/json", "application/octet-stream")


@dataclass
class Served:
    """What the service lends the v2 routes once its model is loaded."""

    current: Callable[[], Classifier | None]  # the model served now (a reload swaps it)
    probabilities: Callable[[Classifier, np.ndarray], Awaitable[torch.Tensor]]  # /predict's batched forward pass


SERVED: Served | None = None  # set by the service (service/service.py) when its model is ready


def handles(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _label(path: str) -> str:
    """A low-cardinality name of the route for the metrics and the log (the path holds a client's text)."""
    parts = path.split("/")
    if len(parts) > 3 and parts[2] == "models":
        return "/v2/models/{name}" + ("/" + parts[-1] if parts[-1] in ("ready", "infer") else "")
    return path if path in ("/v2/health/live", "/v2/health/ready") else "/v2/{other}"


async def _send(send, status: int, body: bytes, headers: list) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json(status: int, obj: dict) -> tuple[int, bytes, list]:
    return status, json.dumps(obj).encode(), [(b"content-type", b"application/json")]


async def handle(scope, receive, send, state, max_body_bytes: int,
                 body_timeouts: tuple[float, float] = (10, 60), *, admission: Admission) -> None:
    """Answer one /v2 request; `state` is the guard's (ready, load_error), `admission` the guard's (an infer
    request holds a place in it from when its body has arrived until its answer is sent)."""
    place = Place(admission, INFER)
    try:
        try:
            status, body, headers = await _answer(scope, receive, state, max_body_bytes, body_timeouts, place)
        except limits.ClientGone:
            return
        except InputError as e:
            label = _label(scope["path"])
            metrics.get().rejected.labels(label, e.reason).inc()
            log.warning("refused %s %s: %d %s: %s", scope["method"], label, e.status, e.reason,
                        " ".join(str(e).split())[:500])
            status, body, headers = _json(e.status, {"error": str(e)})
            headers.append((b"x-imgclf-reason", e.reason.encode()))
            if getattr(e, "retry_after", None):  # admission's 429 (Overloaded)
                headers.append((b"retry-after", str(e.retry_after).encode()))
        await _send(send, status, body, headers)
    finally:  # the answer sent, an error, the client gone or a time-out (a cancellation)
        place.give_back()


def _method(scope, allowed: str) -> None:
    if scope["method"] != allowed:
        raise InputError(f"{scope['method']} {_label(scope['path'])}: this route takes {allowed}", "method", 405)


async def _answer(scope, receive, state, max_body_bytes: int, body_timeouts,
                  place: Place) -> tuple[int, bytes, list]:
    parts = scope["path"].rstrip("/").split("/")[2:]  # "/v2/models/x/infer" -> ["models", "x", "infer"]
    model = SERVED.current() if SERVED is not None and state.ready else None
    not_ready = {"error": f"not ready: {state.load_error or 'the model is still loading'}"}
    if parts == ["health", "live"]:
        _method(scope, "GET")
        return _json(200, {"live": True})
    if parts == ["health", "ready"]:
        _method(scope, "GET")
        return _json(200, {"ready": True}) if model is not None else _json(503, {"ready": False, **not_ready})
    if len(parts) < 2 or parts[0] != "models":
        raise InputError(f"no route {scope['path']!r}; the v2 routes are /v2/health/live, /v2/health/ready, "
                         "/v2/models/{name}, /v2/models/{name}/ready and /v2/models/{name}/infer", "not_found", 404)
    name, version, rest = parts[1], None, parts[2:]
    if rest[:1] == ["versions"] and len(rest) >= 2:
        version, rest = rest[1], rest[2:]
    if rest not in ([], ["ready"], ["infer"]):
        raise InputError(f"no route {scope['path']!r} under /v2/models/{{name}}: take /ready or /infer", "not_found",
                         404)
    if model is None:
        return _json(503, not_ready)
    if name != model.name or version not in (None, model.version):
        asked = name + (f" version {version}" if version else "")
        raise InputError(f"unknown model {asked!r}; this server serves {model.name!r} version {model.version}",
                         "unknown_model", 404)
    if rest == ["infer"]:
        _method(scope, "POST")
        return await _infer(scope, receive, model, max_body_bytes, body_timeouts, place)
    _method(scope, "GET")
    return _json(200, {"name": model.name, "ready": True} if rest else metadata(model))


def metadata(model: Classifier) -> dict:
    """The protocol's model metadata: the served version, its tensors (from the manifest) and its classes."""
    c, h, w = model.spec.shape
    return {"name": model.name, "versions": [model.version],
            "platform": "onnxruntime_onnx" if model.backend == "onnx" else "pytorch_libtorch",
            "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, c, h, w]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(model.classes)]}],
            "parameters": {"classes": model.classes}}


async def _infer(scope, receive, model: Classifier, max_body_bytes: int, body_timeouts,
                 place: Place) -> tuple[int, bytes, list]:
    headers = dict(scope["headers"])
    if limits.content_type(headers) not in _TAKES:
        raise InputError(f"unsupported content type {limits.content_type(headers)!r}; {INFER} takes application/json "
                         "(or application/octet-stream with the binary tensor data extension)", "content_type", 415)
    if headers.get(b"content-encoding", b"identity").strip().lower() not in (b"identity", b""):
        raise InputError("compressed requests are not supported; send the body uncompressed", "content_encoding", 415)
    limits.declared_length(headers, max_body_bytes)
    body = await limits.read_body(receive, max_body_bytes, *body_timeouts)  # 408 as on every route
    place.take()  # once the body has arrived: a slow body holds no place
    x, binary_out, request_id = await parse_body(body, headers.get(b"inference-header-content-length"), model.spec)
    t = time.perf_counter()
    probs = await SERVED.probabilities(model, x)
    m = metrics.get()
    m.latency.labels(INFER, model.version).observe(time.perf_counter() - t)
    m.batch_size.labels(INFER).observe(len(x))
    for label in probs.argmax(1).tolist():
        m.predictions.labels(model.version, model.classes[label]).inc()
    return infer_answer(model, probs, request_id, binary_out)


async def parse_body(body: bytes, header_length: bytes | None, spec) -> tuple[np.ndarray, bool, str | None]:
    """parse_infer_request of the body; a body over 1 MiB is parsed in a child process, off the event loop, as
    /predict's and /evaluate's are (service/offload.py)."""
    if len(body) <= offload.LARGE_BODY_BYTES:
        return parse_infer_request(*split_body(body, header_length), spec)
    try:
        header, payload = await offload.run(functools.partial(_parse_in_child, body, header_length, spec))
    except offload.ChildFailed:  # the child died (out of memory): parsed here instead
        return parse_infer_request(*split_body(body, header_length), spec)
    InputError.raise_carried(header)
    x = np.frombuffer(bytearray(payload), np.uint8).reshape(header["shape"])
    return x, header["binary_out"], header["id"]


def _parse_in_child(body: bytes, header_length: bytes | None, spec) -> tuple[dict, bytes]:
    try:
        x, binary_out, request_id = parse_infer_request(*split_body(body, header_length), spec)
    except InputError as e:
        return e.header(), b""
    return {"shape": list(x.shape), "binary_out": binary_out, "id": request_id}, x.tobytes()


def split_body(body: bytes, header_length: bytes | None) -> tuple[object, bytes]:
    """The JSON inference request and the binary tensor data after it (Inference-Header-Content-Length)."""
    n = len(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InputError(f"Inference-Header-Content-Length {header_length.decode('latin-1')!r} must be a whole "
                             f"number 0..{len(body)} (the body's length)", "bad_header")
    try:
        return json.loads(body[:n]), body[n:]
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting thousands deep
        raise InputError(f"the inference request is not valid JSON ({e}); expected "
                         '{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [N, 28, 28], "data": [...]}]}',
                         "json") from None


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InputError(f"'parameters' of {where} must be an object, got {params!r}", "type")
    return params


def _nest(flat: list, dims: list[int]) -> list:
    """Row-major flat values -> nested lists of `dims` (the batch dimension first)."""
    for d in reversed(dims[1:]):
        flat = [flat[i:i + d] for i in range(0, len(flat), d)]
    return flat


def parse_infer_request(request, binary: bytes, spec) -> tuple[np.ndarray, bool, str | None]:
    """A v2 inference request -> (uint8 images (N, C, H, W), binary output?, request id), or an InputError."""
    c, h, w = spec.shape
    shapes = f"[N, {c}, {h}, {w}]" + (f" or [N, {h}, {w}]" if c == 1 else "")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise InputError(f"expected {{\"inputs\": [one tensor named {INPUT!r}]}}", "inputs")
    tensor, request_id = request["inputs"][0], request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError(f"'id' must be a string, got {request_id!r}", "type")
    if not isinstance(tensor, dict) or tensor.get("name") != INPUT:
        got = tensor.get("name") if isinstance(tensor, dict) else tensor
        raise InputError(f"unknown input {got!r}; this model takes one input {INPUT!r}", "inputs")
    if tensor.get("datatype") != "UINT8":
        raise InputError(f"input {INPUT!r} has datatype {tensor.get('datatype')!r}; send UINT8 pixels 0..255", "type")
    shape = tensor.get("shape")
    ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    if not ok or tuple(shape[1:]) not in ({(c, h, w)} | ({(h, w)} if c == 1 else set())):
        raise InputError(f"input {INPUT!r} has shape {shape!r}; expected {shapes}", "shape")
    n, size, max_images = shape[0], math.prod(shape), settings.get().max_images
    if n == 0:
        raise InputError(f"input {INPUT!r} has no images (N = 0); send at least one", "empty")
    if n > max_images:
        raise InputError(f"{n} images in one request; the limit is {max_images} (MAX_IMAGES)", "too_many", 413)
    params = _parameters(tensor, f"input {INPUT!r}")
    if "binary_data_size" in params:
        if params["binary_data_size"] != size or len(binary) != size or "data" in tensor:
            raise InputError(f"binary tensor data of {len(binary)} bytes (binary_data_size "
                             f"{params['binary_data_size']!r}); shape {shape} takes exactly {size} UINT8 bytes and "
                             "no 'data'", "binary")
        x = np.frombuffer(binary, np.uint8).reshape(n, c, h, w).copy()
    else:
        data = tensor.get("data")
        if binary or not isinstance(data, list):
            raise InputError(f"input {INPUT!r} needs 'data': a list of {size} pixel values (flat or nested)", "missing")
        if data and not isinstance(data[0], list):  # flat, row-major
            if len(data) != size:
                raise InputError(f"'data' holds {len(data)} values; shape {shape} needs {size}", "count")
            data = _nest(data, shape)
        x = parse_images(data, spec, max_images)
        if len(x) != n:
            raise InputError(f"'data' holds {len(x)} images; shape {shape} says {n}", "count")
    return x, _binary_output(request), request_id


def _binary_output(request: dict) -> bool:
    """Whether `probabilities` goes back as binary tensor data: the request's binary_data_output, or the
    output's own binary_data parameter. An output other than `probabilities` is refused."""
    binary = _parameters(request, "the request").get("binary_data_output") is True
    outputs = request.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list) or any(not isinstance(o, dict) or o.get("name") != OUTPUT for o in outputs):
        raise InputError(f"unknown outputs {outputs!r}; this model has one output {OUTPUT!r}", "outputs")
    return any(_parameters(o, f"output {OUTPUT!r}").get("binary_data", binary) is True for o in outputs)


def infer_answer(model: Classifier, probs: torch.Tensor, request_id: str | None,
                 binary: bool) -> tuple[int, bytes, list]:
    out = {"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
    raw = b""
    if binary:
        raw = probs.numpy().astype("<f4").tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
    else:
        out["data"] = probs.reshape(-1).tolist()
    answer = {"model_name": model.name, "model_version": model.version, "outputs": [out]}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer).encode()
    if not binary:
        return 200, header, [(b"content-type", b"application/json")]
    return 200, header + raw, [(b"content-type", b"application/octet-stream"),
                               (b"inference-header-content-length", str(len(header)).encode())]
