"""The default body limit is the largest legal request (service/settings.py largest_request_bytes): the
largest .npz and /evaluate JSON pass, one byte over the limit is 413."""

from __future__ import annotations

import io
import json
import socket

import httpx
import numpy as np
import pytest

from service.settings import ENVELOPE_BYTES, Settings, largest_request_bytes


def _largest_npz(n: int, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, images=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
             labels=rng.integers(0, 10, n).astype(np.int64))
    return buf.getvalue()


def _multipart(data: bytes) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/evaluate_npz", files={"file": ("largest-legal-upload.npz", data)})
    return request.read(), request.headers["content-type"]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_the_derived_limit_holds_the_largest_npz_and_json_and_little_more(shape):
    c, h, w = shape
    limit = largest_request_bytes(shape, 10, max_images=64, max_npz_images=2_000)
    body, _ = _multipart(_largest_npz(2_000, shape if c > 1 else (h, w)))
    assert len(body) <= limit < len(body) + ENVELOPE_BYTES
    image = np.full(shape if c > 1 else (h, w), 255).tolist()
    evaluate = json.dumps({"images": [image] * 5_000, "labels": [9] * 5_000}).encode()
    limit = largest_request_bytes(shape, 10, max_images=5_000, max_npz_images=1)
    assert len(evaluate) <= limit <= len(evaluate) + ENVELOPE_BYTES + 8


def test_max_body_mb_when_set_wins_and_the_default_is_the_largest_npz_of_28x28_images():
    assert Settings(max_body_mb=0.5).body_limit((3, 32, 32), 10) == 524288
    assert Settings().max_body_bytes == 100_000 * (28 * 28 + 8) + ENVELOPE_BYTES  # 75.6 MiB
    assert Settings(max_npz_images=10).body_limit((1, 28, 28), 10) < 5 * 2**20  # then the JSON body bounds it


def test_the_json_routes_are_held_to_the_largest_json_body_not_the_npz():
    """A JSON body is parsed whole (BentoML parses /evaluate's on the event loop): its routes get the largest
    legal JSON request (1,024 images of 255: 3.95 MiB), not the 75.6 MiB of the largest .npz upload."""
    evaluate = json.dumps({"images": [[[255] * 28] * 28] * 1024, "labels": [9] * 1024}).encode()
    limit = Settings().body_limit((1, 28, 28), 10, json_only=True)
    assert len(evaluate) <= limit <= len(evaluate) + ENVELOPE_BYTES + 8 and limit < Settings().max_body_bytes / 18
    assert Settings(max_body_mb=2).body_limit((1, 28, 28), 10, json_only=True) == 2 * 2**20  # set: one limit


def _declared(port: int, length: int, route: bytes = b"/evaluate_npz",
              ctype: bytes = b"multipart/form-data; boundary=b") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                  % (route, ctype, length))
        answer = b""
        while not answer.endswith(b"}") and (chunk := s.recv(4096)):
            answer += chunk
        return answer


@pytest.mark.slow
def test_the_largest_legal_request_passes_and_one_byte_more_is_413(lenet_server):
    """On a real server with the defaults (the session's): an .npz of MAX_NPZ_IMAGES (100,000) images is evaluated
    (it was 413 under the old 64 MiB), the largest /evaluate JSON too; a body one byte over the limit is 413."""
    limit = Settings().max_body_bytes
    s = lenet_server
    body, ctype = _multipart(_largest_npz(100_000, (28, 28)))
    r = httpx.post(s.url + "/evaluate_npz", content=body, headers={"content-type": ctype}, timeout=300)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["n"] == 100_000
    evaluate = {"images": [[[255] * 28] * 28] * 1024, "labels": [9] * 1024}
    assert httpx.post(s.url + "/evaluate", json=evaluate, timeout=120).status_code == 200
    assert httpx.get(s.url + "/model_info", timeout=10).json()["limits"]["max_body_bytes"] == limit
    assert _declared(s.port, limit + 1).startswith(b"HTTP/1.1 413")
    assert b"over the limit of %d bytes" % limit in _declared(s.port, limit + 1)
    # the JSON routes: the largest JSON body passed above; one byte more is refused before it is read
    json_limit = Settings().body_limit((1, 28, 28), 10, json_only=True)
    assert httpx.get(s.url + "/model_info", timeout=10).json()["limits"]["max_json_body_bytes"] == json_limit
    for route in (b"/evaluate", b"/predict"):
        answer = _declared(s.port, json_limit + 1, route, b"application/json")
        assert answer.startswith(b"HTTP/1.1 413") and b"over the limit of %d bytes" % json_limit in answer
