"""Admission: how many requests the service takes at once.

MAX_CONCURRENCY bounds the requests in flight in the whole service, whatever the number of workers and
however unevenly the kernel spreads connections over them. The workers of one server share a small file
in shared memory: one 8-byte count per worker, written by that worker alone (its event loop), and a
request is admitted while the sum of all counts is under the limit. Two workers admitting at the same
instant may both see the last free place, so the limit can be passed by at most WORKERS - 1 requests;
no request is refused while fewer than the limit are in flight. HEAVY_CONCURRENCY bounds the concurrent
/evaluate and /evaluate_npz of each worker.

The guard (service/guard.py) takes a place only after the request's body has arrived (a slow body holds
none) and gives it back when the answer is sent, or on any error, disconnect or time-out. A refusal is a
429 with reason "overloaded" (or "heavy_overloaded") and a Retry-After header.

The file is named after the server (the pid and start time of the process that started the workers), so
a file left by a server that is gone is never read by another one: each worker removes such files when it
starts (BentoML's workers end without running exit handlers when the server stops, so a stopped server's
file of a few bytes stays in /dev/shm until the next server starts).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import mmap
import os
import re
import tempfile
from pathlib import Path

import psutil

from service.inference import InputError
from service.routes import EVALUATE, EVALUATE_NPZ

RETRY_AFTER_S = 1  # what a refused client is told to wait (the Retry-After header)
HEAVY = frozenset({EVALUATE.path, EVALUATE_NPZ.path})
_SLOT = 8  # bytes per int64
_NAME = re.compile(r"imgclf-inflight-(\d+)-(\d+)$")


class Overloaded(InputError):
    """A request over a concurrency limit: 429 with Retry-After."""

    def __init__(self, message: str, reason: str):
        super().__init__(message, reason, 429)
        self.retry_after = RETRY_AFTER_S


def _folder() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _started_ms(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except psutil.Error:
        return None


def server_file(server_pid: int, folder: Path | None = None) -> Path:
    """The shared file of the server whose workers are children of `server_pid`."""
    return (folder or _folder()) / f"imgclf-inflight-{server_pid}-{_started_ms(server_pid) or 0}"


def remove_stale(folder: Path | None = None) -> list[Path]:
    """Remove the files of servers that are gone (their pid ended, or now belongs to a later process)."""
    removed = []
    for path in (folder or _folder()).glob("imgclf-inflight-*"):
        m = _NAME.match(path.name)
        if m and _started_ms(int(m.group(1))) != int(m.group(2)):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


class SharedCount:
    """The in-flight counts of one server's `slots` workers; this process owns slot `index` (0-based).

    Layout, four columns of `slots` int64: in-flight counts, owner pids (0: no live owner), open
    connections and heartbeats (CLOCK_MONOTONIC ns; both kept by service/balance.py). A worker that
    replaces a dead one (BentoML's process manager reuses its index) starts its slot from zero."""

    COLUMNS = 4

    def __init__(self, path: Path, slots: int, index: int):
        if not 0 <= index < slots:
            raise ValueError(f"worker index {index} outside 0..{slots - 1}")
        self.path, self.slots, self.index = path, slots, index
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:  # not removed by a peer's exit meanwhile
                break
            os.close(fd)
        try:
            size = self.COLUMNS * slots * _SLOT
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            self._bytes = memoryview(self._map)
            self._all = self._bytes.cast("q")
            self.counts, self.connections, self.beats = (self._all[c * slots:(c + 1) * slots] for c in (0, 2, 3))
            self.counts[index], self.connections[index], self.beats[index] = 0, 0, 0
            self._all[slots + index] = os.getpid()
        finally:  # the mapping holds a duplicate of the descriptor, so the lock is released explicitly
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self.mine = 0

    def add(self, n: int) -> None:
        self.mine += n
        self.counts[self.index] = self.mine

    def total(self) -> int:
        return sum(self.counts)

    def close(self) -> None:
        """Give up this slot; the last owner to leave removes the file."""
        if self._map.closed:
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.counts[self.index], self._all[self.slots + self.index] = 0, 0
            self.connections[self.index], self.beats[self.index] = 0, 0
            owners = [self._all[self.slots + i] for i in range(self.slots)]
            if os.fstat(fd).st_nlink and not any(pid and psutil.pid_exists(pid) for pid in owners):
                self.path.unlink()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            for view in (self.counts, self.connections, self.beats):
                view.release()
            self._all.release()
            self._bytes.release()
            self._map.close()


class LocalCount:
    """The count of a process serving alone (no BentoML worker index: in-process tests, one worker)."""

    def __init__(self):
        self.mine = 0

    def add(self, n: int) -> None:
        self.mine += n

    def total(self) -> int:
        return self.mine

    def close(self) -> None:
        pass


class Admission:
    """The two limits of one worker; `enter` raises Overloaded or takes a place that `leave` gives back."""

    def __init__(self, count: SharedCount | LocalCount, limit: int, heavy_limit: int):
        self.count, self.limit, self.heavy_limit = count, limit, heavy_limit
        self.heavy = 0

    def enter(self, path: str) -> None:
        if self.count.total() >= self.limit:
            raise Overloaded(f"the service has {self.limit} requests in flight (MAX_CONCURRENCY); "
                             f"retry after {RETRY_AFTER_S} s", "overloaded")
        if path in HEAVY:
            if self.heavy >= self.heavy_limit:
                raise Overloaded(f"this worker runs {self.heavy_limit} evaluations already (HEAVY_CONCURRENCY); "
                                 f"retry after {RETRY_AFTER_S} s", "heavy_overloaded")
            self.heavy += 1
        self.count.add(1)

    def leave(self, path: str) -> None:
        self.count.add(-1)
        if path in HEAVY:
            self.heavy -= 1


class Place:
    """One request's place in an admission: taken once its body has arrived, given back once (when its answer
    is sent, or on any other way out, whichever comes first)."""

    def __init__(self, admission: Admission, path: str):
        self.admission, self.path, self.held = admission, path, False

    def take(self) -> None:
        self.admission.enter(self.path)  # raises Overloaded (429) when the service is full
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.admission.leave(self.path)


def configured_workers(service: str) -> int:
    """The worker count BentoML starts for `service`, read from its merged configuration."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.resource import system_resources

    workers = BentoMLContainer.config.services[service].get().get("workers") or 1
    return int(system_resources()["cpu"]) if workers == "cpu_count" else int(workers)


@functools.cache
def this_workers_share() -> SharedCount | None:
    """This worker's slot in its server's shared file, when BentoML started it as one of several (its
    index from BentoML's server_context, the server from its parent process); None otherwise."""
    from bentoml._internal.context import server_context

    index = server_context.worker_index  # 1-based (BentoML's process manager), None outside a server
    workers = configured_workers(server_context.service_name) if index is not None else 1
    if workers <= 1:
        return None
    remove_stale()
    count = SharedCount(server_file(os.getppid()), workers, index - 1)
    atexit.register(count.close)
    return count


def for_this_worker(limit: int, heavy_limit: int) -> Admission:
    """This worker's admission: counted with the other workers of its server when there are several."""
    return Admission(this_workers_share() or LocalCount(), limit, heavy_limit)
