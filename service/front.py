"""The front door of /predict: the guard's fast path answered outside BentoML's middlewares.

BentoML 1.4.40 stacks its middlewares in `ServiceAppFactory.middlewares` (_bentoml_impl/server/app.py):
its request metrics (outermost), OpenTelemetry, an access log when enabled, TimeoutMiddleware,
MaxConcurrencyMiddleware when `max_concurrency` is set, then the service's own (the guard,
`add_asgi_middleware`), CORS when enabled, and its context middleware. Every /predict paid for each
layer although the guard answers it itself: a task and an uncancelled 60 s timer per request in the
timeout middleware (bentoml/_internal/server/http/traffic.py), four label look-ups in the metrics
middleware, a send wrapper per layer (README "Benchmarks").

The metrics middleware is already ours (service/metric_paths.py subclasses it), so it is the place
where a POST /predict can go straight to the guard. The door does the work of the layers it skips:

- BentoML's request metrics (bentoml_service_request_total, _request_duration_seconds,
  _request_in_progress, _last_request_timestamp_seconds): the same metric objects, the same labels,
  counted when the answer's last body part is sent, as RunnerTrafficMetricsMiddleware does;
- the timeout (REQUEST_TIMEOUT, BentoML's `traffic.timeout`): until the answer starts, as
  TimeoutMiddleware does, with the same 504 answer; the guard's work is cancelled where it waits (a
  request queued for the model leaves its batch), and the timer is cancelled once the answer starts;
- OpenTelemetry: skipped only while the API routes are excluded from tracing (TRACING off).

The door is used only when the chain between the metrics middleware and the guard holds exactly the
layers above (found by following each layer's `app`, as Starlette builds them); with an access log,
BentoML's max_concurrency, tracing on, or any layer a later BentoML adds, every request keeps the full path.
"""

from __future__ import annotations

import asyncio
import json
from timeit import default_timer

from bentoml._internal.context import server_context
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

from service import settings
from service.guard import Guard
from service.routes import PREDICT

PATHS = frozenset({PREDICT.path})
_MAX_LAYERS = 8  # the chain is a handful of layers long; anything longer is not the one described above


def find_guard(app) -> tuple[Guard, float] | None:
    """(the guard, the timeout) when `app`, the layer inside BentoML's metrics middleware, reaches the guard
    through layers the door replaces only; None otherwise."""
    timeout = None
    for _ in range(_MAX_LAYERS):
        if isinstance(app, Guard):
            return (app, timeout) if timeout else None
        if type(app) is TimeoutMiddleware:
            timeout = app.timeout
        elif not (type(app) is OpenTelemetryMiddleware and not settings.get().tracing):
            return None
        app = getattr(app, "app", None)
    return None


class FrontDoor:
    """POST /predict for one app: the guard called directly, counted in BentoML's request metrics and
    bounded by its timeout. `counted` is the app's metrics middleware (set up: it holds the metrics)."""

    def __init__(self, guard: Guard, timeout: float, counted):
        self.guard, self.timeout = guard, timeout
        self.timeout_body = json.dumps({"error": f"Not able to process the request in {timeout} seconds"}).encode()
        names = {"service_name": server_context.bento_name, "service_version": server_context.bento_version,
                 "runner_name": server_context.service_name}
        self._names = names
        self._total, self._duration = counted.metrics_request_total, counted.metrics_request_duration
        self._in_progress = {p: counted.metrics_request_in_progress.labels(endpoint=p, **names) for p in PATHS}
        self._last = counted.metrics_last_request_timestamp.labels(**names)
        self._children: dict[tuple[str, int], tuple] = {}  # (path, status) -> (request_total, request_duration)

    def _count(self, path: str, status: int, seconds: float) -> None:
        children = self._children.get((path, status))
        if children is None:
            labels = {"endpoint": path, "http_response_code": status, **self._names}
            children = self._children[path, status] = (self._total.labels(**labels), self._duration.labels(**labels))
        children[0].inc()
        children[1].observe(seconds)

    async def __call__(self, scope, receive, send) -> None:
        path, start, status = scope["path"], default_timer(), 0
        self._last.set_to_current_time()

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                deadline.reschedule(None)  # as BentoML's: the time until the answer starts
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self._count(path, status, max(default_timer() - start, 0))
            await send(message)

        with self._in_progress[path].track_inprogress():
            try:
                async with asyncio.timeout(self.timeout) as deadline:
                    # One turn of the event loop first, as BentoML's timeout middleware gave (it ran the app as a
                    # task of its own): a client that closes right after sending has its close read before its
                    # request is computed, and the guard finds it gone (tests/test_slow_clients.py)
                    await asyncio.sleep(0)
                    await self.guard(scope, receive, counted_send)
            except TimeoutError:
                if status or not deadline.expired():  # the answer had started, or not this time-out
                    raise
                headers = [(b"content-type", b"application/json"),
                           (b"content-length", str(len(self.timeout_body)).encode())]
                await send({"type": "http.response.start", "status": 504, "headers": headers})
                await send({"type": "http.response.body", "body": self.timeout_body})
                self._count(path, 504, max(default_timer() - start, 0))
