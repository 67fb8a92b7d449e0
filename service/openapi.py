"""What clients are told about refusals: the error answers in the OpenAPI document (/docs.json), and
BentoML's pydantic validation answers reworded to say what is wrong and what the route expects."""

from __future__ import annotations

import json

from service.routes import ROUTES

# Statuses every API route can answer besides 200, as documented in /docs.json. BentoML's generated
# spec lists only 400/404/500, and its 400 schema says `detail` is a string where its own
# validation answers a list: both are corrected here, so the spec matches what clients receive.
ERROR_STATUSES = {
    "400": "Bad Request: the input is malformed; `error` says what is wrong and what is expected",
    "408": "Request Timeout: the body paused more than BODY_TIMEOUT_S or took more than BODY_DEADLINE_S",
    "409": "Conflict: `compare` asked for a challenger and none is loaded (reason `no_challenger`), or its input shape "
           "or classes differ from the champion's (`not_comparable`)",
    "413": "Payload Too Large: body over MAX_BODY_MB, or more images than MAX_IMAGES / MAX_NPZ_IMAGES",
    "415": "Unsupported Media Type: wrong Content-Type, or an image file that is not PNG or JPEG",
    "429": "Too Many Requests: MAX_CONCURRENCY requests in flight in the whole service (reason `overloaded`), or "
           "HEAVY_CONCURRENCY evaluations in this worker (`heavy_overloaded`); retry after the Retry-After seconds",
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
        if path not in ROUTES:
            continue
        for op in item.values():
            if isinstance(op, dict) and "responses" in op:
                op["responses"].update({code: {"description": text, "content": ref}
                                        for code, text in ERROR_STATUSES.items()})
    return spec


async def documented_spec(app, scope, receive, send) -> None:
    """GET /docs.json: BentoML's spec with document_errors applied."""
    start, chunks = {}, []

    async def capture(message):
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, capture)
    body = b"".join(chunks)
    if start.get("status") == 200:
        body = json.dumps(document_errors(json.loads(body))).encode()
        start["headers"] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(start)
    await send({"type": "http.response.body", "body": body})


def explain_validation(path: str, body: bytes) -> bytes:
    """BentoML answers pydantic's errors as {"error": "1 validation error for Input", "detail": [...]}:
    put what was wrong, where, and what is expected into `error` (`detail` stays as it was)."""
    try:
        answer = json.loads(body)
        problems = [f"{'.'.join(map(str, d.get('loc') or [])) or 'body'}: {d.get('msg', '?')}"
                    for d in answer["detail"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return body
    expected = ROUTES[path].expected if path in ROUTES else "see /docs.json for the request schema"
    answer["error"] = f"invalid request ({'; '.join(problems)}); expected {expected}"
    answer["reason"] = "validation"
    return json.dumps(answer).encode()
