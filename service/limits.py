"""The guard's checks of a request before BentoML parses it: content type (415), body size (413, from
Content-Length or counted while the body arrives) and the shape of a multipart upload (400).

Each check raises the same InputError the endpoints raise, so every refusal is answered, counted and
logged one way (service/guard.py).
"""

from __future__ import annotations

import asyncio

from service.inference import InputError
from service.routes import FILE, JSON, Route


class ClientGone(Exception):
    """The client disconnected before its body arrived: nothing to answer."""


TAKES = {JSON: "application/json", FILE: "a multipart/form-data upload with the file in field 'file'"}
SINGLE = (b"content-type", b"content-length")  # headers a request may send once: readers differ on which copy counts
MAX_FILE_NAME_BYTES = 200  # BentoML stores an upload in a temporary file named after it (255 bytes at most)


def request_headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The headers as a dict; a request that repeats Content-Type or Content-Length is refused (400): the
    guard would check one copy while BentoML parsed by another (the 415 could be bypassed)."""
    for name in SINGLE:
        if sum(1 for k, _ in raw if k == name) > 1:
            raise InputError(f"the request sends {name.decode()} more than once; send it once", "bad_header")
    return dict(raw)


def content_type(headers: dict[bytes, bytes]) -> str:
    """The media type of a request, lower case, without parameters ('' when absent)."""
    return headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()


def check_content_type(route: Route, headers: dict[bytes, bytes]) -> None:
    """JSON routes take application/json (or no content type); upload routes take multipart/form-data."""
    ctype = content_type(headers)
    allowed = ("", "application/json") if route.kind == JSON else ("multipart/form-data",)
    if ctype not in allowed:
        raise InputError(f"unsupported content type {ctype!r}; {route.path} takes {TAKES[route.kind]}",
                         "content_type", 415)


def declared_length(headers: dict[bytes, bytes], max_bytes: int) -> int | None:
    """The body length the client declared (None when it sends chunks), refused when over `max_bytes`."""
    length = headers.get(b"content-length")
    if length is None:
        return None
    try:
        n = int(length)
    except ValueError:
        raise InputError("invalid Content-Length header", "bad_header") from None
    if n > max_bytes:
        raise InputError(f"request body of {n} bytes is over the limit of {max_bytes} bytes (MAX_BODY_MB)",
                         "too_large", 413)
    return n


async def read_body(receive, max_bytes: int, pause_s: float = 10, deadline_s: float = 60) -> bytes:
    """The whole body, counted against `max_bytes` while it arrives; 408 when it pauses more than `pause_s`
    between two chunks (BODY_TIMEOUT_S) or takes more than `deadline_s` in all (BODY_DEADLINE_S)."""
    chunks, size, more = [], 0, True
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while more:
        wait = min(pause_s, end - loop.time())
        try:
            async with asyncio.timeout(wait):  # a timer handle, no task: cheap on the hot path
                message = await receive()
        except TimeoutError:
            what = (f"paused more than {pause_s:g} s (BODY_TIMEOUT_S)" if wait == pause_s
                    else f"took more than {deadline_s:g} s (BODY_DEADLINE_S)")
            raise InputError(f"the request body {what} after {size} bytes; send the whole body without "
                             "stalling", "body_timeout", 408) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise InputError(f"request body is over the limit of {max_bytes} bytes (MAX_BODY_MB)", "too_large", 413)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


async def unless_gone(receive, work):
    """Await `work` (a coroutine) while watching the connection, whose body was read already: when the
    client disconnects first, `work` is cancelled where it waits (a request queued for the model leaves
    its batch, service/inference.py Batcher) and ClientGone is raised: nobody is left to answer."""
    task = asyncio.current_task()
    gone = False

    async def watch():
        nonlocal gone
        if (await receive())["type"] == "http.disconnect":
            gone = True
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


def replay(body: bytes):
    """An ASGI receive that hands a body read already on to the next app."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return pending.pop() if pending else {"type": "http.disconnect"}

    return receive


async def check_upload(scope, body: bytes) -> None:
    """Exactly one uploaded file, in field 'file'. BentoML's own parser answers 500 to a binary part under
    another field name, and downloads a URL sent as the text of field 'file': both are refused here."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    problem = None
    try:
        form = await Request(scope, replay(body)).form(max_files=1, max_fields=8)
    except Exception as e:  # noqa: BLE001 - python-multipart and starlette raise several types for malformed bodies
        problem = f"malformed multipart body ({e})"
    else:
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile) and key != "file":
                    problem = f"unexpected file in field {key!r}"
                    break
            files = form.getlist("file")
            if problem is None and (len(files) != 1 or not isinstance(files[0], UploadFile)):
                problem = "no file in field 'file'" if not files else "field 'file' must be one uploaded file, not text"
            name = (files[0].filename or "") if problem is None else ""
            if len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES or "\0" in name:
                problem = f"the file name is {len(name)} characters long (or holds a NUL); send a name of at " \
                          f"most {MAX_FILE_NAME_BYTES} bytes"
        finally:
            await form.close()
    if problem:
        raise InputError(f"{problem}; send the file as multipart form field 'file', e.g. curl -F file=@image.png",
                         "multipart")
