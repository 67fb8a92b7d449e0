"""Real servers for the tests and the benchmarks: a free port, a process group started and stopped
as one, a wait until ready, and the wrk load generator with its figures parsed.

    with Server({"MODEL_NAME": "lenet"}) as s:  # `bentoml serve` of the service, ready in the block
        httpx.post(s.url + "/predict", json=...)
        figures = wrk(s.url + "/predict", body, connections=64, seconds=10)  # requests_per_s, p99_ms, ...
    # stopped here, its workers too

Shared by tests/ and bench/, so it holds no test assertions and imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVICE_CMD = [sys.executable, "-m", "service.cli", "serve"]


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group (a server and its workers), SIGKILL after `timeout` s; no-op once exited.

    `proc` must lead its own group (started with start_new_session=True): otherwise the signal
    would reach the group of the caller."""
    if proc.poll() is not None:
        return
    assert os.getpgid(proc.pid) == proc.pid, f"pid {proc.pid} leads no process group: start it with start_new_session"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(probe: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120,
               log: Callable[[], str] = lambda: "") -> None:
    """Poll `probe` until it returns True. Raises RuntimeError as soon as `proc` exits and TimeoutError
    after `timeout` s, both with the tail of `log()`. An HTTP error from the probe counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{log()[-3000:]}")
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"not ready after {timeout} s:\n{log()[-3000:]}")


def readyz(url: str) -> bool:
    """The service's own readiness: GET /readyz answers 200."""
    return httpx.get(url + "/readyz", timeout=2).status_code == 200


class Server:
    """A real server process on a free localhost port: by default `bentoml serve` of the service.

    It starts when constructed (so several can start side by side), is ready inside `with`, and its
    whole process group is stopped after the block, also when start-up fails. `cmd` gets
    `--port P --host 127.0.0.1` appended; `probe(url)` says when it is ready (default: /readyz 200).
    `workers=None` leaves WORKERS as the environment has it."""

    def __init__(self, env: dict, workers: int | None = 1, log_path: Path | None = None,
                 cmd: list[str] | None = None, cwd: Path | None = None,
                 probe: Callable[[str], bool] = readyz, ready_timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="imgclf-server-", suffix=".log")[1])
        self.probe, self.ready_timeout = probe, ready_timeout
        self._closed = False
        # each server its own BENTOML_HOME: `bentoml serve` empties the Prometheus multiprocess
        # folder there at start, which would wipe another running server's metrics
        self._own_home = not env.get("BENTOML_HOME")
        self.home = Path(env.get("BENTOML_HOME") or tempfile.mkdtemp(prefix="bentoml-home-"))
        self._env = {**os.environ, "DEVICE": "cpu", "BENTOML_DO_NOT_TRACK": "true",
                     **({"WORKERS": str(workers)} if workers is not None else {}), **env,
                     "BENTOML_HOME": str(self.home)}
        self._cmd, self._cwd = cmd or SERVICE_CMD, cwd or ROOT
        self._start()

    def _start(self) -> None:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([*self._cmd, "--port", str(self.port), "--host", "127.0.0.1"],
                                         cwd=self._cwd, env=self._env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until ready. A server that could not bind its port (another process took it between free_port()
        and the bind: servers start side by side) starts again on another port, up to twice."""
        for attempt in range(3):
            try:
                return wait_ready(lambda: self.probe(self.url), self.proc, timeout or self.ready_timeout, self.log)
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self.log():
                    raise
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self._start()

    def __enter__(self) -> Server:
        """`with Server(env) as s:` - ready inside the block, stopped after it (also when start-up fails)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # The tests set this (tests/conftest.py): a stopped server takes seconds to shut down gracefully, mostly
    # waiting, so the block ends at once and the shutdown runs beside what follows; wait_stopped() waits for it.
    # Benchmarks keep the default: nothing of the previous server runs beside the next measurement.
    stop_in_background = False

    def close(self) -> None:
        """End of the server's block: stop() now, or in a background thread when `stop_in_background`.
        Only the first call acts (a server may be closed by its test and again by the fixture that started it)."""
        if self._closed:
            return
        self._closed = True
        if not self.stop_in_background:
            self.stop()
            return
        thread = threading.Thread(target=self.stop, name=f"stop-server-{self.port}", daemon=True)
        thread.start()
        _STOPPING.append(thread)

    def stop(self) -> None:
        """Stop the process group (idempotent); a BENTOML_HOME made for this server is removed."""
        stop(self.proc)
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def worker_rss(self) -> int:
        """RSS in bytes of the process answering requests (the one worker: a child if there is one)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        workers = [p for p in root.children(recursive=True) if "python" in p.name().lower()] or [root]
        return max(p.memory_info().rss for p in workers)


_STOPPING: list[threading.Thread] = []


def wait_stopped() -> None:
    """Wait until every server stopped in the background has exited (its whole process group)."""
    while _STOPPING:
        _STOPPING.pop().join()


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[tuple[Server, ...]]:
    """Wait until every server is ready (they start side by side, each since its construction);
    stop them all after the block, also when one fails to start."""
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.close()


# ------------------------------------------------------------------------------------------
# wrk (Debian package `wrk`): one request body POSTed as fast as the connections allow

_WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BODY_FILE"), "rb"); wrk.body = f:read("*a"); f:close()
"""
# counting every status code makes wrk read each response in Lua: only when asked for
_WRK_LUA_STATUSES = """local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) codes = {} end
function response(status, headers, body) codes[status] = (codes[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("codes")) do io.write(string.format("STATUS %d %d\\n", k, v)) end
  end
end
"""
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def wrk(url: str, body: bytes, connections: int, seconds: int, threads: int = 1, statuses: bool = False) -> dict:
    """POST the JSON `body` to `url` for `seconds` and return wrk's figures:

    requests, requests_per_s, p50_ms and p99_ms (None when wrk printed none), non_2xx,
    socket_errors as (connect, read, write, timeout), statuses ({code: count}, counted only when
    `statuses`; empty otherwise) and text (wrk's whole output). Raises RuntimeError when wrk fails."""
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        body_file, lua = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_file.write_bytes(body)
        lua.write_text(_WRK_LUA + (_WRK_LUA_STATUSES if statuses else ""))
        out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency",
                              "--timeout", "10s", "-s", str(lua), url],
                             capture_output=True, text=True, timeout=seconds + 60,
                             env={**os.environ, "BODY_FILE": str(body_file)})
    text = out.stdout
    total = re.search(r"(\d+) requests in", text)
    if out.returncode != 0 or not total:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{text}{out.stderr}")
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", text, re.M))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    codes: Counter = Counter()
    for code, n in re.findall(r"^STATUS (\d+) (\d+)$", text, re.M):
        codes[int(code)] += int(n)
    return {"requests": int(total.group(1)),
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50_ms": _ms(latency["50"]) if "50" in latency else None,
            "p99_ms": _ms(latency["99"]) if "99" in latency else None,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": tuple(map(int, errors.groups())) if errors else (0, 0, 0, 0),
            "statuses": codes, "text": text}


def _ms(text: str) -> float:
    """wrk's latency text ('812.00us', '1.20ms', '2.01s', '1.00m') in milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    assert m, f"unknown wrk latency {text!r}"
    return float(m.group(1)) * _UNITS_MS[m.group(2)]
