"""The front door of /predict (service/front.py) in-process: which middleware chains it replaces, and the
work of the layers it skips (BentoML's request metrics, the time-out until the answer starts). The same on
a real server: tests/test_service_metrics.py (the request metrics) and tests/test_reliability_service.py
(a /predict over REQUEST_TIMEOUT)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from bentoml._internal.server.http.access import AccessLogMiddleware
from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware, TimeoutMiddleware
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service import front, settings
from service.guard import Guard


async def _inner(scope, receive, send):  # BentoML's app inside the guard: never reached here
    raise AssertionError("not reached")


def _otel(app):
    return OpenTelemetryMiddleware(app, excluded_urls="predict")


def test_the_door_replaces_only_the_layers_it_does_the_work_of(monkeypatch):
    guard = Guard(_inner)
    # BentoML 1.4.40's chain inside its metrics middleware: OpenTelemetry, TimeoutMiddleware, the guard
    assert front.find_guard(_otel(TimeoutMiddleware(guard, timeout=7))) == (guard, 7)
    assert front.find_guard(TimeoutMiddleware(guard, timeout=3)) == (guard, 3)
    # a layer whose work the door does not do keeps every request on the full path
    assert front.find_guard(_otel(AccessLogMiddleware(TimeoutMiddleware(guard, timeout=7)))) is None
    assert front.find_guard(_otel(TimeoutMiddleware(MaxConcurrencyMiddleware(guard, 4), timeout=7))) is None
    assert front.find_guard(_otel(guard)) is None  # no time-out found: the door would answer without one
    assert front.find_guard(_inner) is None
    monkeypatch.setattr(settings, "get", lambda: SimpleNamespace(tracing=True))  # spans wanted for /predict
    assert front.find_guard(_otel(TimeoutMiddleware(guard, timeout=7))) is None


def _metrics():
    """The metrics BentoML's RunnerTrafficMetricsMiddleware holds after its _setup, in a registry of their own."""
    reg = CollectorRegistry()
    labels = ["endpoint", "service_name", "service_version", "http_response_code", "runner_name"]
    return reg, SimpleNamespace(
        metrics_request_total=Counter("bentoml_service_request", "", labels, registry=reg),
        metrics_request_duration=Histogram("bentoml_service_request_duration_seconds", "", labels, registry=reg),
        metrics_request_in_progress=Gauge("bentoml_service_request_in_progress", "",
                                          ["endpoint", "service_name", "service_version", "runner_name"], registry=reg),
        metrics_last_request_timestamp=Gauge("bentoml_service_last_request_timestamp_seconds", "",
                                             ["service_name", "service_version", "runner_name"], registry=reg))


def _count(reg, name: str, status: int) -> float:
    return sum(s.value for m in reg.collect() for s in m.samples
               if s.name == name and s.labels.get("http_response_code") == str(status)
               and s.labels["endpoint"] == "/predict")


async def _call(door) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    await door({"type": "http", "method": "POST", "path": "/predict", "headers": []}, receive, send)
    return sent


def _answer(status: int, before: float = 0, between: float = 0):
    async def app(scope, receive, send):
        await asyncio.sleep(before)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await asyncio.sleep(between)
        await send({"type": "http.response.body", "body": b"{}"})
    return app


def test_the_door_counts_bentomls_request_metrics():
    reg, counted = _metrics()
    door = front.FrontDoor(_answer(200), 5, counted)
    for _ in range(3):
        assert [m.get("status") for m in asyncio.run(_call(door))] == [200, None]
    door.guard = _answer(400)
    asyncio.run(_call(door))
    assert _count(reg, "bentoml_service_request_total", 200) == 3
    assert _count(reg, "bentoml_service_request_total", 400) == 1
    assert _count(reg, "bentoml_service_request_duration_seconds_count", 200) == 3
    assert reg.get_sample_value("bentoml_service_request_in_progress",
                                {"endpoint": "/predict", "service_name": "", "service_version": "not available",
                                 "runner_name": "None"}) == 0


def test_an_answer_that_does_not_start_within_the_timeout_is_bentomls_504_and_its_work_is_cancelled():
    reg, counted = _metrics()
    cancelled = []

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)  # a request queued for the model leaves its batch (service/inference.py)
            raise

    sent = asyncio.run(_call(front.FrontDoor(slow, 0.05, counted)))
    assert sent[0]["status"] == 504 and cancelled == [True]
    assert json.loads(sent[1]["body"]) == {"error": "Not able to process the request in 0.05 seconds"}
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()
    assert _count(reg, "bentoml_service_request_total", 504) == 1


def test_the_timeout_ends_when_the_answer_starts():
    """As BentoML's TimeoutMiddleware: the time until the answer starts; a body still being sent is not cut."""
    _, counted = _metrics()
    sent = asyncio.run(_call(front.FrontDoor(_answer(200, between=0.1), 0.05, counted)))
    assert [m.get("status") for m in sent] == [200, None]


def test_a_time_out_raised_inside_the_guard_is_not_taken_for_the_requests():
    _, counted = _metrics()

    async def raises(scope, receive, send):
        raise TimeoutError("from somewhere inside")

    with pytest.raises(TimeoutError, match="inside"):
        asyncio.run(_call(front.FrontDoor(raises, 5, counted)))
