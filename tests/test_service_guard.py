"""The guard's parts in-process: the route table, the request checks (service/limits.py), the error
documentation (service/openapi.py) and the log filter that keeps refusals to one line. The same
behaviour on a real server: tests/test_service_http.py."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest
from pydantic import BaseModel, ValidationError

from service import limits, openapi
from service.guard import _QuietRefusals
from service.inference import InputError
from service.routes import FILE, JSON, ROUTES


def _record(exc: Exception) -> logging.LogRecord:
    try:
        raise exc
    except type(exc):
        return logging.LogRecord("bentoml._internal.server.http_app", logging.ERROR, __file__, 1,
                                 "Exception on %s [%s]", ("/predict", "POST"), sys.exc_info())


def test_bentomls_traceback_is_dropped_for_refusals_and_kept_for_faults():
    from bentoml.exceptions import BadInput, InternalServerError

    class M(BaseModel):
        x: int

    with pytest.raises(ValidationError) as e:
        M.model_validate({"x": "no"})
    quiet = _QuietRefusals()
    assert not quiet.filter(_record(e.value))  # pydantic's 400: the guard logs one WARNING line instead
    assert not quiet.filter(_record(BadInput("bad")))  # BentoML's own 4xx
    assert quiet.filter(_record(RuntimeError("a real fault")))  # a 500 keeps its traceback
    assert quiet.filter(_record(InternalServerError("boom")))
    assert logging.getLogger("bentoml._internal.server.http_app").filters  # installed on import


def test_the_route_table_covers_the_documented_api():
    assert set(ROUTES) == {"/predict", "/predict_image", "/evaluate", "/evaluate_npz", "/model_info"}
    assert {r.path for r in ROUTES.values() if r.kind == FILE} == {"/predict_image", "/evaluate_npz"}
    assert all(r.kind in (JSON, FILE) and r.expected for r in ROUTES.values())


def _refused(call) -> InputError:
    with pytest.raises(InputError) as e:
        call()
    return e.value


def test_content_types_per_kind_of_route():
    predict, upload = ROUTES["/predict"], ROUTES["/evaluate_npz"]
    limits.check_content_type(predict, {})
    limits.check_content_type(predict, {b"content-type": b"application/json; charset=utf-8"})
    limits.check_content_type(upload, {b"content-type": b"multipart/form-data; boundary=x"})
    e = _refused(lambda: limits.check_content_type(predict, {b"content-type": b"text/plain"}))
    assert e.status == 415 and "/predict takes application/json" in str(e)
    e = _refused(lambda: limits.check_content_type(upload, {b"content-type": b"application/json"}))
    assert e.status == 415 and "multipart/form-data" in str(e)


def test_body_size_is_checked_declared_and_while_read():
    assert limits.declared_length({b"content-length": b"10"}, 10) == 10
    assert limits.declared_length({}, 10) is None
    assert _refused(lambda: limits.declared_length({b"content-length": b"11"}, 10)).status == 413
    assert _refused(lambda: limits.declared_length({b"content-length": b"x"}, 10)).reason == "bad_header"

    def chunks(*parts):
        messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
        return lambda: asyncio.sleep(0, messages.pop(0))

    assert asyncio.run(limits.read_body(chunks(b"abc", b"de"), 5)) == b"abcde"
    e = _refused(lambda: asyncio.run(limits.read_body(chunks(b"abc", b"def"), 5)))
    assert e.status == 413 and "MAX_BODY_MB" in str(e)


def test_validation_answers_say_what_the_route_expects():
    body = b'{"error": "1 validation error for Input", "detail": [{"loc": ["labels"], "msg": "Field required"}]}'
    answer = json.loads(openapi.explain_validation("/evaluate", body))
    assert answer["error"] == f"invalid request (labels: Field required); expected {ROUTES['/evaluate'].expected}"
    assert answer["reason"] == "validation" and answer["detail"][0]["loc"] == ["labels"]
    assert openapi.explain_validation("/evaluate", b"not json") == b"not json"


def test_every_api_route_documents_every_refusal():
    spec = {"paths": {path: {"post": {"responses": {"200": {}}}} for path in (*ROUTES, "/livez")}}
    spec = openapi.document_errors(spec)
    for path in ROUTES:
        assert set(openapi.ERROR_STATUSES) <= set(spec["paths"][path]["post"]["responses"])
    assert set(spec["paths"]["/livez"]["post"]["responses"]) == {"200"}


def test_a_place_is_given_back_when_the_answer_is_sent_not_when_the_app_returns():
    """An answer's last byte sent frees its MAX_CONCURRENCY place at once: what the app does after it (Starlette
    closing an upload's temporary file) must not refuse the client's next request with 429 below the limit."""
    from service import admission
    from service.guard import Guard

    cleanup = asyncio.Event()
    seen_after_answer = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        seen_after_answer.append(guard.admission.count.total())
        await cleanup.wait()  # still running, the answer sent

    guard = Guard(app)
    guard.admission = admission.Admission(admission.LocalCount(), 1, heavy_limit=1)
    body = json.dumps({"images": [[[0] * 28] * 28], "labels": [0]}).encode()

    async def call():
        chunks = [body]

        async def receive():
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": False}
            await asyncio.Event().wait()

        async def send(message):
            pass

        scope = {"type": "http", "method": "POST", "path": "/evaluate", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}
        first = asyncio.create_task(guard(scope, receive, send))
        while not seen_after_answer:
            await asyncio.sleep(0)
        assert guard.admission.count.total() == 0  # the app still runs, its place is free
        guard.admission.enter("/evaluate")  # the next request is admitted under MAX_CONCURRENCY=1
        guard.admission.leave("/evaluate")
        cleanup.set()
        await first
        assert guard.admission.count.total() == 0  # given back once, not twice

    asyncio.run(call())
    assert seen_after_answer == [0]
