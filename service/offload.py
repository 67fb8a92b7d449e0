"""Work on a large request body done in a forked child process, so the worker's event loop keeps serving.

Parsing JSON holds the GIL from start to end (json, pydantic and numpy alike: measured, a 65 MB body
parsed on another thread kept the event loop's thread waiting 5 to 10 s), so a thread does not help:
two 56 MB bodies used to stop every other client of their workers for seconds. Above
LARGE_BODY_BYTES the guard's fast path parses in a child instead: forked from the worker (nothing
to import, nothing pickled), lower priority than the workers, at most MAX_CHILDREN at a time per
worker. The child sends back a JSON header and raw bytes through a pipe; the parent waits on the
pipe in a thread, with the GIL released.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable

LARGE_BODY_BYTES = 1 << 20  # 1 MiB: a 1,024-image /predict body is about 3 MB, a single image about 2.5 KB
MAX_CHILDREN = 2  # per worker: children beyond it wait their turn
NICE = 10  # the children's priority below the workers'

_slots: asyncio.Semaphore | None = None


class ChildFailed(Exception):
    """The child ended without an answer (killed, out of memory): the caller takes its regular path."""


async def run(fn: Callable[[], tuple[dict, bytes]]) -> tuple[dict, bytes]:
    """`fn()` in a forked child: its (JSON-able header, payload bytes). An exception in the child or a
    child that dies raises ChildFailed; a cancelled caller kills the child."""
    global _slots
    if _slots is None:
        _slots = asyncio.Semaphore(MAX_CHILDREN)
    async with _slots:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            _child(fn, write_fd)
        os.close(write_fd)
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(None, _read_all, read_fd)
        except asyncio.CancelledError:
            os.kill(pid, signal.SIGKILL)
            raise
        finally:
            os.close(read_fd)
            await loop.run_in_executor(None, os.waitpid, pid, 0)
    header, sep, payload = data.partition(b"\n")
    if not sep:
        raise ChildFailed("the child ended without an answer")
    answer = json.loads(header)
    if "failed" in answer:
        raise ChildFailed(answer["failed"])
    return answer, payload


def _child(fn: Callable[[], tuple[dict, bytes]], write_fd: int) -> None:
    code = 0
    try:
        # The worker's signal handlers would wake the worker's event loop through the inherited wake-up fd
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        os.nice(NICE)
        try:
            header, payload = fn()
        except Exception as e:  # noqa: BLE001 - the parent takes its regular path and says why
            header, payload = {"failed": f"{type(e).__name__}: {e}"[:500]}, b""
        with os.fdopen(write_fd, "wb") as out:
            out.write(json.dumps(header).encode() + b"\n")
            out.write(payload)
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the worker
        code = 1
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
