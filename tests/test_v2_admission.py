"""The Open Inference Protocol's infer route under admission (service/v2.py, dispatched by service/guard.py),
in-process: the guard's own ASGI entry with a stand-in model, so the service-wide count (MAX_CONCURRENCY,
service/admission.py) is read at every step. An infer request takes a place once its body has arrived and gives
it back whatever its answer; a full service refuses it with the 429 + Retry-After of /predict, in the v2 error
shape; the health and metadata routes take no place and answer while the service is full. The last test shows
the same on a real server."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from bench.harness import Server
from core.manifest import InputSpec
from service import admission, guard, v2
from tests.conftest import lenet_env

MODEL = SimpleNamespace(name="lenet", version="v1", spec=InputSpec(1, 28, 28, (0.5,), (0.5,)),
                        classes=[f"class{i}" for i in range(10)], backend="torch")
INFER = "/v2/models/lenet/infer"
ONE = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": [7] * 784}]}


async def _never_called(scope, receive, send):
    raise AssertionError(f"BentoML's app reached for {scope['path']}: the guard answers every /v2 route itself")


class Served:
    """A guard whose admission allows `limit` requests, in front of a ready stand-in model; the model's forward pass
    notes the service's in-flight count and, when `hold` is set, waits for it."""

    def __init__(self, limit: int):
        self.guard = guard.Guard(_never_called)
        self.guard.admission = admission.Admission(admission.LocalCount(), limit, heavy_limit=1)
        self.during_forward: list[int] = []
        self.hold: asyncio.Event | None = None

    def in_flight(self) -> int:
        return self.guard.admission.count.total()

    async def probabilities(self, model, x):
        self.during_forward.append(self.in_flight())
        if self.hold is not None:
            await self.hold.wait()
        return torch.full((len(x), len(model.classes)), 1 / len(model.classes))

    async def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict, list[int]]:
        """(status, headers, JSON answer, the in-flight count seen each time the body was read)."""
        data = json.dumps(body).encode() if body is not None else b""
        chunks = [data[:100], data[100:]]
        while_reading, sent = [], []

        async def receive():
            while_reading.append(self.in_flight())
            if chunks:
                return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
            await asyncio.Event().wait()  # the client waits for its answer

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}
        await self.guard(scope, receive, send)
        start = sent[0]
        answer = b"".join(m.get("body", b"") for m in sent[1:])
        return start["status"], dict(start["headers"]), json.loads(answer), while_reading


@pytest.fixture
def served(monkeypatch):
    s = Served(limit=1)
    monkeypatch.setattr(v2, "SERVED", v2.Served(lambda: MODEL, s.probabilities))
    monkeypatch.setattr(guard.STATE, "ready", True)
    return s


def test_a_v2_infer_is_refused_429_with_retry_after_while_the_service_is_full(served):
    async def scenario():
        served.guard.admission.enter("/predict")  # the one place (MAX_CONCURRENCY=1) held by a /predict
        status, headers, answer, _ = await served.call("POST", INFER, ONE)
        assert status == 429, answer
        assert headers[b"retry-after"] == b"1" and headers[b"x-imgclf-reason"] == b"overloaded"
        assert set(answer) == {"error"} and "MAX_CONCURRENCY" in answer["error"], answer  # v2's error object
        assert served.during_forward == [] and served.in_flight() == 1  # refused before any work, nothing taken
        # the health and metadata routes take no place: they answer while the service is full
        for path, expected in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
                               ("/v2/models/lenet/ready", {"name": "lenet", "ready": True})):
            assert (await served.call("GET", path))[::2] == (200, expected), path
        status, _, meta, _ = await served.call("GET", "/v2/models/lenet")
        assert status == 200 and meta["versions"] == ["v1"]
        served.guard.admission.leave("/predict")
        assert (await served.call("POST", INFER, ONE))[0] == 200  # room again
        assert served.in_flight() == 0

    asyncio.run(scenario())


def test_a_v2_infer_holds_a_place_from_its_body_to_its_answer_and_gives_it_back(served):
    async def scenario():
        status, _, answer, while_reading = await served.call("POST", INFER, ONE)
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 10], answer
        assert while_reading == [0, 0]  # no place while the body arrives
        assert served.during_forward == [1]  # one place while it is computed
        assert served.in_flight() == 0  # given back after the answer
        # a refused infer (its body arrived, then found wrong) gives its place back too
        bad = {"inputs": [{**ONE["inputs"][0], "shape": [1, 3, 28, 28]}]}
        status, headers, answer, _ = await served.call("POST", INFER, bad)
        assert (status, headers[b"x-imgclf-reason"]) == (400, b"shape") and "expected [N, 1, 28, 28]" in answer["error"]
        assert served.in_flight() == 0
        assert (await served.call("POST", INFER, ONE))[0] == 200  # the one place is free: not leaked
        assert served.in_flight() == 0

    asyncio.run(scenario())


def test_a_v2_infer_cancelled_while_computed_gives_its_place_back(served):
    """A time-out or a server stop cancels the request's task: the place comes back as after an answer."""
    async def scenario():
        served.hold = asyncio.Event()
        task = asyncio.create_task(served.call("POST", INFER, ONE))
        while not served.during_forward:
            await asyncio.sleep(0)
        assert served.in_flight() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert served.in_flight() == 0

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_real_server_full_with_an_evaluation_refuses_v2_infer_429_and_serves_it_after(lenet_version):
    """MAX_CONCURRENCY=1: while a 10,000-image /evaluate_npz holds the one place, a v2 infer is a 429 with
    Retry-After in the v2 error shape; once it is done the place is free again,
    after answered, refused and malformed infer requests alike (a place kept would make every later one a 429)."""
    rng = np.random.default_rng(11)
    buf = io.BytesIO()
    np.savez(buf, images=rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 10000))
    with Server({**lenet_env(lenet_version), "MAX_CONCURRENCY": "1"}, workers=1) as s, httpx.Client(timeout=60) as c:
        assert c.post(s.url + INFER, json=ONE).status_code == 200
        evaluations = []

        def evaluate():  # an evaluation whose body arrives while an infer holds the place is a 429 too: retried
            with httpx.Client(timeout=60) as own:
                for _ in range(3):
                    for _attempt in range(100):
                        r = own.post(s.url + "/evaluate_npz", files={"file": ("t.npz", buf.getvalue())})
                        if r.status_code != 429:
                            break
                    evaluations.append(r)

        evaluation = threading.Thread(target=evaluate)
        evaluation.start()
        refused = None
        while evaluation.is_alive() and refused is None:
            r = c.post(s.url + INFER, json=ONE)
            assert r.status_code in (200, 429), r.text
            refused = r if r.status_code == 429 else None
        evaluation.join()
        assert [r.status_code for r in evaluations] == [200] * 3, [r.text[:300] for r in evaluations]
        assert refused is not None, "no infer overlapped three 10k evaluations"
        assert refused.headers["retry-after"] == "1" and refused.headers["x-imgclf-reason"] == "overloaded"
        assert list(refused.json()) == ["error"] and "MAX_CONCURRENCY" in refused.json()["error"]
        # the evaluation's place comes back when its request ends, a moment after its client has the answer
        # (Starlette still closes the uploaded file): its client's thread can end first
        deadline = time.monotonic() + 5
        while (r := c.post(s.url + INFER, json=ONE)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        bad = {"inputs": [{**ONE["inputs"][0], "datatype": "FP32"}]}
        assert c.post(s.url + INFER, json=bad).status_code == 400
        assert [c.post(s.url + INFER, json=ONE).status_code for _ in range(3)] == [200] * 3
        assert c.post(s.url + "/predict", json={"images": [[[0] * 28] * 28]}).status_code == 200
