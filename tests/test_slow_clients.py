"""Slow and vanishing clients, without the proxy: the service itself refuses a body that stalls (408,
BODY_TIMEOUT_S between chunks, BODY_DEADLINE_S in all) while answering others, and a request whose client
went away leaves the model's queue uncomputed. (With the proxy in front: tests/test_proxy.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from bench.harness import Server
from service import limits
from service.inference import Batcher
from tests.conftest import lenet_env

ONE_IMAGE = json.dumps({"images": [[[0] * 28] * 28]}).encode()


# --- in process: the guard's reading and watching, the batcher's queue -------------------------

def test_read_body_times_out_between_chunks_and_in_all():
    async def stalls():  # one chunk, then nothing
        sent.append(1)
        if len(sent) == 1:
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(3600)

    async def trickles():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b" ", "more_body": True}

    sent: list = []
    with pytest.raises(limits.InputError) as e:
        asyncio.run(limits.read_body(stalls, 100, pause_s=0.2, deadline_s=5))
    assert (e.value.status, e.value.reason) == (408, "body_timeout") and "BODY_TIMEOUT_S" in str(e.value)
    assert "after 1 bytes" in str(e.value)
    t = time.monotonic()
    with pytest.raises(limits.InputError) as e:
        asyncio.run(limits.read_body(trickles, 10_000, pause_s=0.2, deadline_s=0.5))
    assert (e.value.status, e.value.reason) == (408, "body_timeout") and "BODY_DEADLINE_S" in str(e.value)
    assert 0.45 < time.monotonic() - t < 2


def test_the_408_is_documented_in_the_openapi_spec():
    from service import openapi

    spec = openapi.document_errors({"paths": {"/predict": {"post": {"responses": {}}}}})
    assert "BODY_TIMEOUT_S" in spec["paths"]["/predict"]["post"]["responses"]["408"]["description"]


def test_unless_gone_cancels_the_work_when_the_client_disconnects_and_not_otherwise():
    async def gone_after(delay):
        await asyncio.sleep(delay)
        return {"type": "http.disconnect"}

    async def work(seconds):
        await asyncio.sleep(seconds)
        return "answer"

    async def run(work_s, gone_s):
        return await limits.unless_gone(lambda: gone_after(gone_s), work(work_s))

    assert asyncio.run(run(0.01, 5)) == "answer"
    with pytest.raises(limits.ClientGone):
        asyncio.run(run(5, 0.01))


class _Gate:
    """A stand-in classifier whose forward pass waits for `release`; it records the images of each pass."""

    device, version = torch.device("cpu"), "gate"

    def __init__(self):
        self.release, self.passes = threading.Event(), []

    def probabilities(self, x: np.ndarray) -> torch.Tensor:
        self.release.wait(10)
        self.passes.append(x[:, 0, 0, 0].tolist())
        return torch.zeros(len(x), 10)


def test_a_request_cancelled_while_queued_is_not_computed():
    gate = _Gate()
    batcher = Batcher(gate, inline_max=0)  # every pass on the inference thread: the gate must not block the loop
    image = [np.full((1, 1, 28, 28), i, np.uint8) for i in range(4)]

    async def run():
        first = asyncio.ensure_future(batcher.probabilities(image[0]))  # runs at once, held by the gate
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.probabilities(x)) for x in image[1:]]
        await asyncio.sleep(0.05)
        queued[1].cancel()  # its client went away (service/limits.py unless_gone) while it waited
        gate.release.set()
        return await asyncio.gather(first, queued[0], queued[2])

    answers = asyncio.run(run())
    assert [len(a) for a in answers] == [1, 1, 1]
    assert gate.passes == [[0], [1, 3]], "image 2 was cancelled while queued: it must not be computed"
    assert not batcher.pending and not batcher.draining


# --- real servers -----------------------------------------------------------------------------

def _stalled(port: int, declared: int, sent: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (declared, sent))
    return s


def _answer(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", data, re.I).group(1)):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


@pytest.mark.slow
def test_a_stalled_body_is_408_after_body_timeout_s_while_others_are_answered(lenet_version):
    env = {**lenet_env(lenet_version), "BODY_TIMEOUT_S": "1", "BODY_DEADLINE_S": "3"}
    with Server(env) as s:
        t = time.monotonic()
        stalled = [_stalled(s.port, 1000, b'{"images": [') for _ in range(20)]
        r = httpx.post(s.url + "/predict", content=ONE_IMAGE, headers={"content-type": "application/json"}, timeout=5)
        assert r.status_code == 200 and r.elapsed.total_seconds() < 1
        for sock in stalled:
            status, body = _answer(sock)
            assert (status, body["reason"]) == (408, "body_timeout") and "BODY_TIMEOUT_S" in body["error"]
            sock.close()
        assert 0.9 < time.monotonic() - t < 3
        # a body that keeps trickling (one byte every 0.3 s) is cut at BODY_DEADLINE_S
        t = time.monotonic()
        trickling = _stalled(s.port, 1000, b"{")
        trickling.settimeout(0.3)
        status = None
        while status is None and time.monotonic() - t < 10:
            try:
                status, body = _answer(trickling)
            except TimeoutError:
                trickling.sendall(b" ")
        assert (status, body["reason"]) == (408, "body_timeout") and "BODY_DEADLINE_S" in body["error"]
        assert 2.9 < time.monotonic() - t < 5
        trickling.close()
        assert "refused POST /predict: 408 body_timeout" in s.log()


@pytest.mark.slow
def test_requests_whose_clients_went_away_are_counted_and_not_answered(lenet_server):
    """20 clients send a /predict and close at once, behind 4 large ones still waiting: the 4 are answered,
    the 20 are counted as abandoned and the server keeps serving."""
    big = json.dumps({"images": np.random.default_rng(0).integers(0, 256, (1024, 28, 28)).tolist()}).encode()
    s = lenet_server  # the session's server: the count is compared with the count before
    before = _abandoned(s.url)

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            live = [asyncio.ensure_future(client.post(s.url + "/predict", content=big)) for _ in range(4)]
            await asyncio.sleep(0.05)
            for _ in range(20):
                sock = socket.create_connection(("127.0.0.1", s.port))
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ONE_IMAGE), ONE_IMAGE))
                sock.close()
            return await asyncio.gather(*live)

    assert [r.status_code for r in asyncio.run(run())] == [200] * 4
    deadline = time.monotonic() + 10
    while (abandoned := _abandoned(s.url) - before) < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert abandoned == 20
    assert httpx.post(s.url + "/predict", content=ONE_IMAGE, timeout=5).status_code == 200


def _abandoned(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r'^imgclf_abandoned_requests_total\{endpoint="/predict"\} (\S+)$',
                                            text, re.M))
