"""An ASGI middleware in front of the endpoints: body-size limit (413), content types (415), the
real reason on /readyz when the model was refused (503), and the count of every refused request.

It runs inside BentoML's own middlewares (metrics, timeout, max concurrency), so their figures
include what it refuses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from service import inference, metrics

JSON_ROUTES = {"/predict", "/evaluate", "/model_info"}
FILE_ROUTES = {"/predict_image", "/evaluate_npz"}


@dataclass
class State:
    ready: bool = False
    load_error: str | None = None
    predict: Callable | None = None  # the service instance's predict method, once loaded
    reload_error: str | None = None  # the last promoted version that failed to load, and why
    max_body_bytes: int = int(float(os.environ.get("MAX_BODY_MB", "64")) * 1024 * 1024)

    def reset(self) -> None:
        self.ready, self.load_error, self.predict = False, None, None

    def limits(self) -> dict:
        return {"max_images": inference.MAX_IMAGES, "max_npz_images": inference.MAX_NPZ_IMAGES,
                "max_body_bytes": self.max_body_bytes,
                "max_concurrency": int(os.environ.get("MAX_CONCURRENCY", "256")),
                "request_timeout_s": float(os.environ.get("REQUEST_TIMEOUT", "60"))}


STATE = State()


async def _answer(send, status: int, body: dict, reason: str | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if reason:
        headers.append((b"x-imgclf-reason", reason.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _check_upload(scope, body: bytes) -> str | None:
    """What is wrong with a multipart upload, or None. BentoML's own parser answers 500 to a binary
    part under another field name, and downloads a URL sent as the text of field 'file': refuse both."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=8)
    except Exception as e:  # python-multipart and starlette raise several types for malformed bodies
        return f"malformed multipart body ({e})"
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile) and key != "file":
                return f"unexpected file in field {key!r}"
        files = form.getlist("file")
        if len(files) != 1 or not isinstance(files[0], UploadFile):
            return "no file in field 'file'" if not files else "field 'file' must be one uploaded file, not text"
        return None
    finally:
        await form.close()


# Statuses every API route can answer besides 200, as documented in /docs.json. BentoML's generated
# spec lists only 400/404/500, and its 400 schema says `detail` is a string where its own
# validation answers a list: both are corrected here, so the spec matches what clients receive.
ERROR_STATUSES = {
    "400": "Bad Request: the input is malformed; `error` says what is wrong and what is expected",
    "413": "Payload Too Large: body over MAX_BODY_MB, or more images than MAX_IMAGES / MAX_NPZ_IMAGES",
    "415": "Unsupported Media Type: wrong Content-Type, or an image file that is not PNG or JPEG",
    "429": "Too Many Requests: more than MAX_CONCURRENCY requests in flight on this worker; retry later",
    "503": "Service Unavailable: no model loaded (the reason is in `error`), or overloaded",
    "504": "Gateway Timeout: the request took longer than REQUEST_TIMEOUT seconds",
}
ERROR_SCHEMA = {
    "type": "object", "title": "ErrorAnswer", "required": ["error"],
    "properties": {
        "error": {"type": "string", "title": "Message"},
        "reason": {"type": "string", "title": "Short fixed label of the refusal"},
        "model_version": {"type": "string", "nullable": True, "title": "Version that refused it"},
        "detail": {"title": "Error Detail (a string, or pydantic's list of validation errors)"},
    },
}


def document_errors(spec: dict) -> dict:
    """Add the refusals this service answers (ERROR_STATUSES) to every API operation of the spec."""
    spec.setdefault("components", {}).setdefault("schemas", {})["ErrorAnswer"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}}
    for path, item in spec.get("paths", {}).items():
        if path not in JSON_ROUTES and path not in FILE_ROUTES:
            continue
        for op in item.values():
            if isinstance(op, dict) and "responses" in op:
                op["responses"].update({code: {"description": text, "content": ref}
                                        for code, text in ERROR_STATUSES.items()})
    return spec


async def _documented_spec(app, scope, receive, send) -> None:
    """GET /docs.json: BentoML's spec with document_errors applied."""
    start, chunks = {}, []

    async def capture(message):
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, capture)
    body = b"".join(chunks)
    if start.get("status") != 200:
        await send(start)
        return await send({"type": "http.response.body", "body": body})
    await _answer(send, 200, document_errors(json.loads(body)))


_IMAGES = '"images": [H x W lists of pixel values 0..255 (the shape is in /model_info), ...]'
EXPECTED = {
    "/predict": "{" + _IMAGES + ', "top_k": 1..10 (optional)}',
    "/evaluate": "{" + _IMAGES + ', "labels": [an integer class index per image]}',
    "/model_info": "an empty body",
}


def _explain_validation(path: str, body: bytes) -> bytes:
    """BentoML answers pydantic's errors as {"error": "1 validation error for Input", "detail": [...]}:
    put what was wrong, where, and what is expected into `error` (`detail` stays as it was)."""
    try:
        answer = json.loads(body)
        problems = [f"{'.'.join(map(str, d.get('loc') or [])) or 'body'}: {d.get('msg', '?')}"
                    for d in answer["detail"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return body
    expected = EXPECTED.get(path, "see /docs.json for the request schema")
    answer["error"] = f"invalid request ({'; '.join(problems)}); expected {expected}"
    answer["reason"] = "validation"
    return json.dumps(answer).encode()


class Guard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/model_info" and scope["method"] == "GET":
            # BentoML routes APIs as POST only; a GET reads the same answer (empty body)
            scope = {**scope, "method": "POST", "headers": [h for h in scope["headers"] if h[0] != b"content-type"]}
        if path == "/readyz" and not STATE.ready:
            why = STATE.load_error or "the model is still loading"
            return await _answer(send, 503, {"error": f"not ready: {why}"})
        if path == "/docs.json" and scope["method"] == "GET":
            return await _documented_spec(self.app, scope, receive, send)
        if path not in JSON_ROUTES and path not in FILE_ROUTES:
            return await self.app(scope, receive, send)

        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        refusal = None
        if path in JSON_ROUTES and ctype not in ("", "application/json"):
            refusal = (415, f"unsupported content type {ctype!r}; {path} takes application/json", "content_type")
        elif path in FILE_ROUTES and ctype != "multipart/form-data":
            refusal = (415, f"unsupported content type {ctype!r}; {path} takes a multipart/form-data upload "
                       "with the file in field 'file'", "content_type")
        length = headers.get(b"content-length")
        if refusal is None and length is not None:
            try:
                if int(length) > STATE.max_body_bytes:
                    refusal = (413, f"request body of {int(length)} bytes is over the limit of "
                               f"{STATE.max_body_bytes} bytes (MAX_BODY_MB)", "too_large")
            except ValueError:
                refusal = (400, "invalid Content-Length header", "bad_header")
        if refusal is not None:
            status, message, reason = refusal
            metrics.get().rejected.labels(path, reason).inc()
            return await _answer(send, status, {"error": message, "reason": reason}, reason)

        fast = path == "/predict" and scope["method"] == "POST" and STATE.predict is not None
        body = None
        if length is None or fast or path in FILE_ROUTES:  # read the body here, counted against the limit
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > STATE.max_body_bytes:
                    metrics.get().rejected.labels(path, "too_large").inc()
                    return await _answer(send, 413, {"error": f"request body is over the limit of "
                                                     f"{STATE.max_body_bytes} bytes (MAX_BODY_MB)",
                                                     "reason": "too_large"}, "too_large")
                chunks.append(chunk)
                more = msg.get("more_body", False)
            body = b"".join(chunks)
            if path in FILE_ROUTES and (problem := await _check_upload(scope, body)):
                metrics.get().rejected.labels(path, "multipart").inc()
                return await _answer(send, 400, {"error": f"{problem}; send the file as multipart form field 'file', "
                                                 "e.g. curl -F file=@image.png", "reason": "multipart"}, "multipart")
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():  # noqa: F811 - hand the buffered body on
                return replay.pop() if replay else {"type": "http.disconnect"}

        held: dict = {}  # BentoML's own 400 (pydantic validation), held back to make its message say what is wrong

        async def counting_send(message):
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                hdrs = dict(message.get("headers", []))
                reason = hdrs.get(b"x-imgclf-reason", b"").decode() or (
                    "validation" if message["status"] == 400 else f"http_{message['status']}")
                metrics.get().rejected.labels(path, reason).inc()
                if reason == "validation":
                    held.update(start=message, body=b"")
                    return
            elif held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                body = _explain_validation(path, held["body"])
                start = {**held["start"], "headers": [(k, str(len(body)).encode() if k == b"content-length" else v)
                                                      for k, v in held["start"].get("headers", [])]}
                held.clear()
                await send(start)
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        if fast:
            # The hot path: a well-formed {"images": [...], "top_k": int} goes straight to the same
            # ImageClassifier.predict method BentoML would call, skipping its routing, IO-model
            # parsing and response machinery (see README "Benchmarks"). Anything else takes the
            # regular route, so its answers (and pydantic's messages) stay exactly as documented.
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                payload = None
            if (isinstance(payload, dict) and isinstance(payload.get("images"), list) and set(payload) <= {"images", "top_k"}
                    and type(payload.get("top_k", 3)) is int):
                response = await STATE.predict(payload["images"], payload.get("top_k", 3))
                return await response(scope, receive, counting_send)

        return await self.app(scope, receive, counting_send)
