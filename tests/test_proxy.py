"""The shipped proxy (deploy/nginx/nginx.conf, run by the real nginx) in front of a real server: slowloris
connections and trickled bodies cost the service nothing, and a normal client is answered at once.

The attack runs on asyncio sockets (one thread: the machine has 2 shared cores). The test process and
nginx need more than 10,000 file descriptors: the soft limit is raised to the hard one here.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from bench.harness import free_port, stop, wait_ready
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HALF_OPEN, TRICKLING = 10_000, 600
ONE_IMAGE = json.dumps({"images": [[[0] * 28] * 28]}).encode()
CLIENT = "127.0.0.2"  # the normal client's own address (the whole of 127/8 is loopback on Linux)


def shipped_config(listen: int, upstream: int) -> str:
    """The shipped file with only its two ports changed (free ports of this test)."""
    text = CONF.read_text()
    assert text.count("listen 8080 ") == 1 and text.count("server 127.0.0.1:3000 ") == 1
    return text.replace("listen 8080 ", f"listen 127.0.0.1:{listen} ").replace(
        "server 127.0.0.1:3000 ", f"server 127.0.0.1:{upstream} ")


@pytest.fixture(scope="module")
def proxied(lenet_server):
    """(proxy URL, server): nginx with the shipped configuration in front of the session's real 1-worker server
    (the attack ends at nginx: the server behind it is unchanged for the tests after these)."""
    assert Path(NGINX).exists(), "nginx missing: make tools (apt-get install nginx)"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HALF_OPEN + TRICKLING + 1_000
    assert hard >= need, f"the hard limit of open files is {hard}; this test needs {need} (ulimit -Hn)"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # nginx, started below, inherits it
    prefix = Path(tempfile.mkdtemp(prefix="imgclf-proxy-"))
    prefix.chmod(0o755)  # run as root, nginx's workers are `nobody`: they write their buffers under it
    port = free_port()
    try:
        conf = prefix / "nginx.conf"
        conf.write_text(shipped_config(port, lenet_server.port))
        log = prefix / "nginx.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, proc, 30, log.read_text)
            yield url, lenet_server
        finally:
            stop(proc)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        shutil.rmtree(prefix, ignore_errors=True)


def _open_many(port: int, n: int, payload: bytes, sources: list[str | None]) -> list[socket.socket]:
    """n connections that each sent `payload`, opened one after another in this thread (a loopback connect
    and a small send return at once; far faster than a task per connection on 2 busy cores)."""
    socks = []
    for i in range(n):
        s = socket.socket()
        if sources[i % len(sources)]:
            s.bind((sources[i % len(sources)], 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(payload)
        s.setblocking(False)
        socks.append(s)
    return socks


async def _trickle(socks: list[socket.socket], every: float = 2.0) -> None:
    """One byte of JSON whitespace per connection every `every` s: within client_body_timeout, forever."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        for s in socks:
            await loop.sock_sendall(s, b" ")


def _open_still(s: socket.socket) -> bool:
    """True while the peer has neither closed the connection nor answered on it."""
    try:
        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an answer (408) or the end of the connection
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


async def _normal_client(url: str, n: int = 5) -> list[tuple[int, float]]:
    """n /predict requests, one after another, from the client's own address: (status, seconds) each."""
    transport = httpx.AsyncHTTPTransport(local_address=CLIENT)
    results = []
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        for _ in range(n):
            t = time.perf_counter()
            r = await client.post(url + "/predict", content=ONE_IMAGE, headers={"content-type": "application/json"})
            results.append((r.status_code, time.perf_counter() - t))
    return results


async def _attack_and_serve(url: str, port: int) -> dict:
    # the trickling bodies come from 20 addresses, 30 each, under the per-client cap of 64: nginx admits
    # them all and buffers them, so only request buffering stands between them and the service
    head = (b"POST /predict HTTP/1.1\r\nHost: imgclf\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n{\"images\": ")
    slow = _open_many(port, TRICKLING, head, [f"127.0.1.{i}" for i in range(1, 21)])
    trickler = asyncio.create_task(_trickle(slow))
    await asyncio.sleep(2.5)  # the tricklers have sent more: their requests are being read by nginx
    t0 = time.monotonic()
    half = _open_many(port, HALF_OPEN, b"POST /predict HTTP/1.1\r\nHost: imgclf\r\nContent-Type: applic", [None])
    opened_in = time.monotonic() - t0
    try:
        answers = await _normal_client(url)
        held = {"half_open": sum(map(_open_still, half)), "trickling": sum(map(_open_still, slow))}
        # the header timeout (10 s from the connection) closes the half-open connections: all by 13 s from t0
        while (after_timeout := sum(map(_open_still, half))) and time.monotonic() - t0 < 13:
            await asyncio.sleep(0.5)
    finally:
        trickler.cancel()
        for s in half + slow:
            s.close()
    return {"opened_in": opened_in, "answers": answers, "held": held, "after_timeout": after_timeout}


def test_slowloris_and_trickling_bodies_leave_a_normal_client_answered_within_1_s(proxied):
    url, server = proxied
    port = int(url.rsplit(":", 1)[1])
    out = asyncio.run(_attack_and_serve(url, port))
    assert out["opened_in"] < 8, f"opening the connections took {out['opened_in']:.1f} s: the check came too late"
    # every attacking connection was still held by nginx while the normal client was served
    assert out["held"] == {"half_open": HALF_OPEN, "trickling": TRICKLING}, out["held"]
    assert [status for status, _ in out["answers"]] == [200] * 5, out["answers"]
    assert max(seconds for _, seconds in out["answers"]) < 1.0, out["answers"]
    assert out["after_timeout"] == 0, f"{out['after_timeout']} half-open connections outlived client_header_timeout"
    # and through it all the service answered directly too (it never saw the attack)
    assert httpx.post(server.url + "/predict", content=ONE_IMAGE, timeout=5).status_code == 200


def test_one_address_past_the_per_client_cap_is_refused_with_429(proxied):
    url, _ = proxied
    port = int(url.rsplit(":", 1)[1])

    async def run():
        head = (b"POST /predict HTTP/1.1\r\nHost: imgclf\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{")
        socks = _open_many(port, 70, head, ["127.0.0.3"])
        await asyncio.sleep(1)
        answered = []
        for s in socks:
            try:
                answered.append(s.recv(64, socket.MSG_DONTWAIT))
            except BlockingIOError:
                answered.append(None)
        for s in socks:
            s.close()
        return answered

    answered = asyncio.run(run())
    assert answered[:64] == [None] * 64  # the first 64 are being read, patiently
    assert all(a and a.startswith(b"HTTP/1.1 429") for a in answered[64:]), answered[64:]


def test_the_proxy_refuses_a_body_over_the_largest_legal_request_and_hides_metrics(proxied):
    url, server = proxied
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # refused on its Content-Length alone
        s.sendall(b"POST /evaluate_npz HTTP/1.1\r\nHost: imgclf\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: %d\r\n\r\n" % (76 * 1024 * 1024 + 1))
        assert s.recv(64).startswith(b"HTTP/1.1 413")
    assert httpx.get(url + "/metrics", timeout=5).status_code == 404
    assert httpx.get(server.url + "/metrics", timeout=5).status_code == 200
