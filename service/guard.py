"""An ASGI middleware in front of the endpoints. It composes the request checks of service/limits.py
(415, 413, the multipart upload), the documentation of service/openapi.py (/docs.json, reworded
validation answers), the real reason on /readyz while no model is served (503), the fast path of
/predict, and the Open Inference Protocol v2 routes under /v2 (service/v2.py: BentoML routes take no
path parameters). Every refused request (4xx) is counted and logged as one WARNING line.

It runs inside BentoML's own middlewares (metrics, timeout), so their figures include what it refuses; a
POST /predict reaches it from outside them (service/front.py), which counts the same metrics and time-out.
It also admits each API request and each v2 infer request, once its body has arrived, under MAX_CONCURRENCY
(counted over all workers) and HEAVY_CONCURRENCY (service/admission.py).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

from service import admission, limits, metrics, offload, openapi, rollout, settings, v2
from service.inference import InputError
from service.routes import FILE, JSON, ROUTES, Route

log = logging.getLogger("imgclf")


@dataclass
class FastRoute:
    """An API the guard calls directly: BentoML's own input model for it, and the bound endpoint method."""

    input_model: type  # pydantic model (BentoML's APIMethod.input_spec)
    call: Callable | None  # None: a body that is not large takes BentoML's route
    # a body over offload.LARGE_BODY_BYTES: parse(body) -> (header, payload) runs in a child process,
    # answer(header, payload) answers from it in the worker (service/offload.py)
    parse: Callable[[bytes], tuple[dict, bytes]] | None = None
    answer: Callable | None = None


@dataclass
class State:
    ready: bool = False
    load_error: str | None = None  # why no model is served: a short message for clients (no server paths)
    load_reason: str | None = None  # its reason code (service/recovery.py)
    fast: dict[str, FastRoute] = field(default_factory=dict)  # route path -> FastRoute, once a model is loaded
    reload_error: str | None = None  # the last promoted version that failed to load, and why
    max_body_bytes: int | None = None  # the body limit for the served model's input (settings.body_limit)
    max_json_body_bytes: int | None = None  # the same for the JSON routes (/predict, /evaluate, /v2 infer)

    def reset(self) -> None:
        self.ready, self.load_error, self.load_reason, self.fast = False, None, None, {}
        self.max_body_bytes = self.max_json_body_bytes = None


STATE = State()


class _QuietRefusals(logging.Filter):
    """BentoML logs every request its parsing refuses (pydantic's ValidationError, its own 4xx exceptions)
    at ERROR with a traceback (`log_exception` in bentoml/_internal/server/http_app.py, called by
    _bentoml_impl/server/app.py). The guard logs each refusal as one WARNING line instead; real faults
    (any other exception, a 5xx) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        refused = isinstance(exc, ValidationError) or (isinstance(exc, BentoMLException) and exc.error_code < 500)
        return not refused


logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietRefusals())


async def _send_json(send, status: int, body: bytes, headers: list) -> None:
    headers = [(k, v) for k, v in headers if k != b"content-length"] + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _note_refusal(scope, status: int, reason: str, body: bytes) -> None:
    """Count a 4xx answer and log it as one line: route, status, reason and the answer's message."""
    metrics.get().rejected.labels(scope["path"], reason).inc()
    try:
        message = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        message = ""
    message = " ".join(str(message).split())[:500]  # one line, whatever the client sent
    log.warning("refused %s %s: %d %s: %s", scope["method"], scope["path"], status, reason, message)


async def refuse(scope, send, e: InputError) -> None:
    """The guard's own refusal: {"error", "reason"} with the reason also in a header, counted and logged."""
    body = json.dumps({"error": str(e), "reason": e.reason}).encode()
    _note_refusal(scope, e.status, e.reason, body)
    retry = [(b"retry-after", str(e.retry_after).encode())] if getattr(e, "retry_after", None) else []
    await _send_json(send, e.status, body, [(b"content-type", b"application/json"),
                                            (b"x-imgclf-reason", e.reason.encode()), *retry])


def watch_refusals(scope, send):
    """The send for an answer from inside: a 4xx is held until complete, then counted and logged, and
    BentoML's validation answer (400 without the endpoints' reason header) reworded to say what is expected."""
    held: dict = {}

    async def watched(message):
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            held.update(start=message, body=b"")
            return
        if not held or message["type"] != "http.response.body":
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        start, body = held.pop("start"), held.pop("body")
        status, headers = start["status"], start.get("headers", [])
        reason = dict(headers).get(b"x-imgclf-reason", b"").decode() or (
            "validation" if status == 400 else f"http_{status}")
        if reason == "validation":
            body = openapi.explain_validation(scope["path"], body)
        _note_refusal(scope, status, reason, body)
        await _send_json(send, status, body, headers)

    return watched


class Guard:
    """For an API route: check, read when needed, then answer by the fast path or hand on to BentoML."""

    def __init__(self, app):
        self.app = app
        config = settings.get()
        self.max_body_bytes = config.max_body_bytes  # until a model is loaded: the limits for 28x28 images
        self.max_json_body_bytes = config.max_json_body_bytes
        self.body_timeouts = (config.body_timeout_s, config.body_deadline_s)
        self.admission = admission.for_this_worker(config.max_concurrency, config.heavy_concurrency)

    async def __call__(self, scope, receive, send):
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self._not_an_api(scope, receive, send)
        if route.also_get and scope["method"] == "GET":  # read with an empty body, as the POST
            scope = {**scope, "method": "POST", "headers": [h for h in scope["headers"] if h[0] != b"content-type"]}
        fast = STATE.fast.get(route.path) if scope["method"] == "POST" else None
        rollout.pin(scope["headers"])  # x-model-version, read by the endpoints (service/rollout.py)
        place = admission.Place(self.admission, route.path)
        try:  # the whole body first, with its timeouts: a slow one holds no place in the concurrency limits
            body = await self._checked_body(route, scope, receive)
            place.take()
        except InputError as e:
            return await refuse(scope, send, e)
        except limits.ClientGone:
            return metrics.get().abandoned.labels(route.path).inc()

        async def send_then_leave(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                place.give_back()  # the client has its answer: what follows (an upload's file closed) holds none

        try:
            return await self._admitted(route, fast, body, scope, receive, send_then_leave)
        finally:  # an error, the client gone or a time-out (a cancellation)
            place.give_back()

    async def _admitted(self, route: Route, fast: FastRoute | None, body: bytes, scope, receive, send):
        client, receive = receive, limits.replay(body)
        if fast is not None:
            try:  # a client that goes away is not computed for
                response = await limits.unless_gone(client, self._fast_answer(fast, body))
            except limits.ClientGone:
                return metrics.get().abandoned.labels(route.path).inc()
            if response is not None:
                # a 2xx goes straight out; only a refusal needs the watching send (counted and logged)
                return await response(scope, receive, send if response.status_code < 400
                                      else watch_refusals(scope, send))
        return await self.app(scope, receive, watch_refusals(scope, send))

    async def _not_an_api(self, scope, receive, send):
        """/readyz while not ready: 503 with the reason; /docs.json: documented errors; the rest: BentoML's."""
        if scope["type"] == "http" and scope["path"] == "/readyz" and not STATE.ready:
            why = STATE.load_error or "the model is still loading"
            reason = STATE.load_reason or "loading"
            body = json.dumps({"error": f"not ready: {why}", "reason": reason}).encode()
            return await _send_json(send, 503, body, [(b"content-type", b"application/json"),
                                                      (b"x-imgclf-reason", reason.encode())])
        if scope["type"] == "http" and v2.handles(scope["path"]):  # the Open Inference Protocol (service/v2.py)
            return await v2.handle(scope, receive, send, STATE, self._body_limit(json_route=True), self.body_timeouts,
                                   admission=self.admission)
        if scope["type"] == "http" and scope["path"] == "/docs.json" and scope["method"] == "GET":
            return await openapi.documented_spec(self.app, scope, receive, send)
        return await self.app(scope, receive, send)

    def _body_limit(self, json_route: bool) -> int:
        """MAX_BODY_MB, or the largest legal request of the served model (of a JSON route when `json_route`): a JSON
        body is parsed whole, so it is held to a JSON body's size, not to the far larger .npz upload's."""
        limit = STATE.max_json_body_bytes if json_route else STATE.max_body_bytes
        return limit or (self.max_json_body_bytes if json_route else self.max_body_bytes)

    async def _checked_body(self, route: Route, scope, receive) -> bytes:
        """Check content type and size, then read the body here, with its timeouts (408), before any
        endpoint or BentoML's parser waits on a slow client; BentoML gets it replayed."""
        headers = limits.request_headers(scope["headers"])
        limits.check_content_type(route, headers)
        max_bytes = self._body_limit(route.kind == JSON)
        limits.declared_length(headers, max_bytes)
        body = await limits.read_body(receive, max_bytes, *self.body_timeouts)
        if route.kind == FILE:
            await limits.check_upload(scope, body)
        return body

    @staticmethod
    async def _fast_answer(fast: FastRoute, body: bytes):
        """The hot path: a body BentoML's input model accepts goes straight to the same endpoint method
        BentoML would call, skipping its routing and response machinery (README "Benchmarks"). A body it
        refuses returns None and takes BentoML's route, so pydantic's answers stay exactly as documented.
        A large body is parsed in a child process, off the event loop (service/offload.py)."""
        if fast.parse is not None and len(body) > offload.LARGE_BODY_BYTES:
            try:
                header, payload = await offload.run(functools.partial(fast.parse, body))
            except offload.ChildFailed:
                return None  # pydantic refused it (or the child died): BentoML's route answers
            return await fast.answer(header, payload)
        if fast.call is None:
            return None
        try:
            inputs = fast.input_model.model_validate_json(body or b"{}")  # as BentoML's JSON serde parses it
        except ValidationError:
            return None
        return await fast.call(**{name: getattr(inputs, name) for name in type(inputs).model_fields})
