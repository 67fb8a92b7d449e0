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


def client_reason(e: BaseException, root: str | Path) -> tuple[str, str]:
    """(reason code, short message) of a failed load, fit for an anonymous client: files named relative to
    the artifacts folder `root`, no other absolute path, no errno text (an OS error says only that the
    artifacts cannot be read). A refused name (InvalidName) is quoted as configured."""
    if isinstance(e, OSError):
        return "artifacts_unreadable", "the model's files cannot be read on the server"
    reasons = ((artifacts.ArtifactNotFound, "model_not_found"), (artifacts.IntegrityError, "integrity"),
               (artifacts.ArtifactError, "invalid_artifact"))
    reason = next((code for kind, code in reasons if isinstance(e, kind)), "load_failed")
    text = str(e)
    if isinstance(e, artifacts.InvalidName):
        return reason, text[:300]
    for prefix in {str(Path(root).resolve()), str(Path(root).absolute()), str(root)}:
        text = text.replace(prefix.rstrip("/") + "/", "")
    return reason, _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "/", text)[:300]


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
