"""Champion and challenger side by side: which version a request is answered by (canary, the
`x-model-version` pin), the shadow comparison, and the watcher that keeps each slot on the version its
alias names (the champion's PROMOTED file, the challenger's alias), verified before it serves.

    CHALLENGER       a version (pinned: never reloaded) or an alias of MODEL_NAME (followed like the
                     champion); default: the `challenger` alias when it is set (service/settings.py)
    CANARY_PERCENT   that share of /predict and /predict_image requests is answered by the challenger
    SHADOW=1         the challenger classifies the champion's /predict inputs off the response path and
                     counts imgclf_shadow_agreement_total{champion,challenger,agree}

A request header `x-model-version: VERSION` pins a request to a loaded version; a version not loaded is
refused with 409 `version_not_loaded`, naming the loaded versions. Pinned and canary answers are not
shadowed (the shadow compares the challenger with the champion's own answers).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import artifacts, registry
from service import metrics, recovery
from service.inference import Classifier, InputError

log = logging.getLogger("imgclf")

PIN_HEADER = b"x-model-version"
# the version a request pins (its x-model-version header), set by the guard for each API request: the
# endpoints run in the request's task, or in one created from it (the fast path), so they see it
PINNED: ContextVar[str | None] = ContextVar("imgclf_pinned_version", default=None)
SHADOW_MAX_PENDING = 64  # shadow passes waiting per worker; one more is dropped (imgclf_shadow_dropped_total)
NOT_LOADED_STATUS = 409  # a pin to a version this service does not serve now: a state of the server, not a typo


def pin(raw_headers: list[tuple[bytes, bytes]]) -> None:
    """Set PINNED from a request's headers (None when it names no version)."""
    value = next((v for k, v in raw_headers if k.lower() == PIN_HEADER), None)
    PINNED.set(value.decode("latin-1").strip() if value is not None else None)


def choose(champion: Classifier, challenger: Classifier | None, percent: float,
           shadow: bool) -> tuple[Classifier, Classifier | None]:
    """(the model that answers this request, the model that shadows the answer or None). A pinned request
    gets the version it names (409 if not loaded), otherwise `percent` % of requests go to the challenger."""
    if challenger is not None and not compatible(challenger, champion):
        challenger = None  # never answer with a model of another input or class list (checked at load too)
    pinned = PINNED.get()
    if pinned is not None:
        for model in (champion, challenger):
            if model is not None and model.version == pinned:
                return model, None
        loaded = ", ".join(f"{m.version} ({role})" for m, role in ((champion, "champion"), (challenger, "challenger"))
                           if m is not None)
        raise InputError(f"x-model-version {pinned[:100]!r} is not a version this service serves now; loaded "
                         f"versions: {loaded}", "version_not_loaded", NOT_LOADED_STATUS)
    if challenger is None:
        return champion, None
    if percent > 0 and random.random() * 100 < percent:
        return challenger, None
    return champion, challenger if shadow else None


def compatible(a: Classifier, b: Classifier) -> bool:
    """Whether `a` can answer what was parsed for `b`: the same input shape and classes (each version
    normalises the uint8 pixels with its own mean and std)."""
    return a.spec.shape == b.spec.shape and a.classes == b.classes


# --- where a slot's version comes from, and loading one ------------------------------------------

@dataclass(frozen=True)
class ChallengerSource:
    """CHALLENGER resolved: a pinned version, or an alias read again at every poll."""

    root: str
    name: str
    setting: str | None  # None: no challenger
    default: bool  # the setting is the default alias: its absence is no error

    @property
    def pinned(self) -> bool:
        return self.setting is not None and (Path(self.root) / self.name / self.setting / "manifest.json").is_file()

    def version(self) -> str | None:
        """The version to serve now: the pinned one, the alias's holder, or None."""
        if self.setting is None or self.pinned:
            return self.setting
        return registry.get_alias(self.root, self.name, self.setting)

    def unset_error(self) -> str | None:
        """Why no challenger is served though one was asked for (None for the default alias, not set)."""
        if self.setting is None or self.default:
            return None
        return f"CHALLENGER {self.setting!r} is neither a version of {self.name} nor a set alias"


def load_version(root: str, name: str, version: str, device: torch.device, backend: str,
                 like: Classifier | None = None) -> Classifier:
    """Load, verify and warm up one version (artifacts.load checks every hash). `like`: the champion whose
    input and classes it must share to be served beside it."""
    model = Classifier(artifacts.load(root, name, version, device=device), device, backend)
    if like is not None and not compatible(model, like):
        raise ValueError(f"{name}/{version} takes inputs of shape {model.spec.shape} with classes {model.classes}, "
                         f"the champion {like.version} {like.spec.shape} with {like.classes}: it cannot answer the "
                         "champion's requests")
    model.warm_up()
    return model


def watch(root: str, name: str, every: float, target: Callable[[], str | None],
          current: Callable[[], Classifier | None], load: Callable[[str], Classifier],
          swap: Callable[[Classifier | None], None], refused: Callable[[str, BaseException], None]) -> None:
    """Keep one slot on the version `target()` names, polling every `every` s (runs forever in its thread).
    A new version is loaded and verified beside the old one (`load`), then handed to `swap`; requests in
    flight finish on the model they started with. A version that fails is reported to `refused` and the
    old one serves on; it is tried again as soon as its files or the PROMOTED file change (a repair, a new
    promote), otherwise after a backoff that doubles up to 5 minutes. `target()` None: swap(None)."""
    failed, retry_at, delays = None, 0.0, recovery.backoff(every, 300)
    while True:
        time.sleep(every)
        try:
            version = target()
        except (artifacts.ArtifactError, OSError):
            continue
        model = current()
        if version == (model.version if model is not None else None):
            continue
        if version is None:
            swap(None)
            continue
        attempt = (version, recovery.files_state(root, name, version))
        if attempt == failed and time.monotonic() < retry_at:
            continue
        try:
            new = load(version)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the old version keeps serving
            if attempt != failed:
                delays = recovery.backoff(every, 300)
            failed, retry_at = attempt, time.monotonic() + next(delays)
            refused(version, e)
            continue
        failed = None
        swap(new)


# --- shadow ---------------------------------------------------------------------------------------

class Shadow:
    """The challenger's pass over the images the champion answered, as a background task on the
    worker's event loop through the challenger's own batcher, after the answer is computed; at most
    SHADOW_MAX_PENDING passes wait, the images of one more are dropped and counted."""

    def __init__(self, limit: int = SHADOW_MAX_PENDING):
        self.limit, self.pending = limit, set()

    def submit(self, champion: str, labels: list[int], challenger: Classifier, x: np.ndarray) -> None:
        if len(self.pending) >= self.limit:
            metrics.get().shadow_dropped.inc(len(labels))
            return
        task = asyncio.get_running_loop().create_task(self._compare(champion, labels, challenger, x))
        self.pending.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self.pending.discard)

    @staticmethod
    async def _compare(champion: str, labels: list[int], challenger: Classifier, x: np.ndarray) -> None:
        try:
            probs = await challenger.batcher.probabilities(x)
        except Exception as e:  # noqa: BLE001 - the champion's answer has gone out; count the images as dropped
            metrics.get().shadow_dropped.inc(len(labels))
            log.warning("shadow pass of %s failed: %s", challenger.version, e)
            return
        agree = int((probs.argmax(1) == torch.tensor(labels)).sum())
        counter = metrics.get().shadow_agreement
        counter.labels(champion, challenger.version, "true").inc(agree)
        counter.labels(champion, challenger.version, "false").inc(len(labels) - agree)


def info(source: ChallengerSource | None, challenger: Classifier | None, error: str | None) -> dict | None:
    """/model_info's `challenger` block: the served challenger (version, its offline accuracy), or null
    with the reason it is not served."""
    if source is None or source.setting is None:
        return None
    return {"setting": source.setting, "pinned": source.pinned,
            "model_version": challenger.version if challenger else None,
            "offline_test_accuracy": challenger.loaded.manifest.metrics.test_accuracy if challenger else None,
            "error": error}
