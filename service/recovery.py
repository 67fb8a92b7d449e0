"""What the service does when loading a version fails: a reason code and a short message for clients (the full
text, with server paths and errno details, goes to the log only), the backoff of a retried load, and the
state of a version's files, so a refused version is tried again once they change (a repair, a new promote).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from core import artifacts

# an absolute path in an error message: shown to clients as its last part only
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:,;]+/)*([^\s'\"/:,;]*)")


def client_reason(e: BaseException) -> tuple[str, str]:
    """(reason code, short message) of a failed load, fit for an anonymous client: no absolute path, no
    errno text. The artifact errors' own messages say which file and what is wrong, with paths cut to the
    file name; an OS error says only that the artifacts cannot be read."""
    if isinstance(e, artifacts.ArtifactNotFound):
        reason = "model_not_found"
    elif isinstance(e, artifacts.IntegrityError):
        reason = "integrity"
    elif isinstance(e, artifacts.ArtifactError):
        reason = "invalid_artifact"
    elif isinstance(e, OSError):
        return "artifacts_unreadable", "the model's files cannot be read on the server"
    else:
        return "load_failed", "the model failed to load on the server (the server log says why)"
    return reason, _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "/", str(e))[:300]


def backoff(first: float, most: float) -> Iterator[float]:
    """Delays in seconds between load attempts: `first`, doubling, at most `most`."""
    delay = first
    while True:
        yield min(delay, most)
        delay = min(delay * 2, most)


def files_state(root: str | Path, name: str, version: str) -> tuple:
    """Size and modification time of the PROMOTED file and of every file of the version: a load that failed
    is worth another try when this changes (files repaired, the version promoted again)."""
    folder = Path(root) / name / version

    def stat(p: Path):
        try:
            s = p.stat()
        except OSError as e:
            return p.name, e.errno
        return p.name, s.st_size, s.st_mtime_ns

    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        names = [f"(unlisted: {e.errno})"]
    return (stat(Path(root) / name / artifacts.PROMOTED), *(stat(folder / n) for n in names))
