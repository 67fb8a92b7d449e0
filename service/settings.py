"""The service's settings: one frozen dataclass, read once from the environment, every default visible.

This is the only module of the service that reads the environment. WORKERS (service/placement.py) and
REQUEST_TIMEOUT reach BentoML as the @bentoml.service arguments; BentoML's own configuration (a
BENTOML_CONFIG file, BENTOML_CONFIG_OVERRIDES, BENTOML_CONFIG_OPTIONS such as
`services.imgclf.traffic.timeout=30`) is merged over them and wins. MAX_CONCURRENCY is enforced by the
guard over all workers (service/admission.py), not by BentoML. `limits_in_force`
reads BentoML's merged result, so what the service reports is what BentoML enforces.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable with a value the service does not take; the message names it and what is allowed."""


# --- parsers: raw text -> value, or ValueError("what is allowed") ----------------------------

def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("a non-empty string")
    return raw


def _optional_text(raw: str) -> str | None:
    return raw or None  # MODEL_VERSION="" means "not pinned"


def _number(cast: Callable, allowed: str, ok: Callable) -> Callable[[str], float]:
    def parse(raw: str):
        try:
            value = cast(raw)
        except ValueError:
            raise ValueError(allowed) from None
        if not ok(value):
            raise ValueError(allowed)
        return value
    return parse


_positive_int = _number(int, "a whole number >= 1", lambda v: v >= 1)
_positive_float = _number(float, "a number > 0", lambda v: math.isfinite(v) and v > 0)
_non_negative_float = _number(float, "a number >= 0 (0: off)", lambda v: math.isfinite(v) and v >= 0)
_port = _number(int, "a port number 1..65535", lambda v: 1 <= v <= 65535)


def _workers(raw: str) -> int | str | None:
    if not raw:
        return None  # WORKERS="" (as `make` passes it) means "not set": the default rule
    return raw if raw == "cpu_count" else _number(int, "cpu_count or a whole number >= 1", lambda v: v >= 1)(raw)


def _device(raw: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", raw):
        raise ValueError("auto, cpu, cuda or cuda:N")
    return raw


def _backend(raw: str) -> str:
    if raw not in ("auto", "torch", "onnx"):
        raise ValueError("auto, torch or onnx")
    return raw


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("0 (off) or 1 (on)")
    return raw == "1"


def _challenger(raw: str) -> str | None:
    if raw in ("", "none"):
        return None  # no challenger
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", raw):
        raise ValueError("an alias or a version of MODEL_NAME (letters, digits, '.', '_', '-'), or '' / none")
    return raw


_percent = _number(float, "a number 0..100 (0: off)", lambda v: math.isfinite(v) and 0 <= v <= 100)


def _var(env: str, default, meaning: str, parse: Callable[[str], object]):
    return field(default=default, metadata={"env": env, "meaning": meaning, "parse": parse})


@dataclass(frozen=True)
class Settings:
    artifacts_dir: str = _var("ARTIFACTS_DIR", "artifacts",
                              "where versions live (a built Bento serves its bundled copy)", _text)
    model_name: str = _var("MODEL_NAME", "cnn", "which model", _text)
    model_version: str | None = _var("MODEL_VERSION", None, "which version (unset: the promoted one, else the newest)",
                                     _optional_text)
    device: str = _var("DEVICE", "auto", "auto (a GPU when torch sees one), cpu, cuda or cuda:N", _device)
    workers: int | str | None = _var("WORKERS", None, "worker processes: a number, or cpu_count (one per core); "
                                     "unset: cpu_count, or on a GPU WORKERS_PER_GPU per visible GPU", _workers)
    workers_per_gpu: int = _var("WORKERS_PER_GPU", 8, "workers per visible GPU when a GPU is used and WORKERS is "
                                "unset (at most one per CPU core; measured on an H200, docs/serving.md \"GPU\")",
                                _positive_int)
    max_images: int = _var("MAX_IMAGES", 1024, "images per JSON request (413 above)", _positive_int)
    max_npz_images: int = _var("MAX_NPZ_IMAGES", 100_000, "images per .npz upload (413 above)", _positive_int)
    max_body_mb: float | None = _var("MAX_BODY_MB", None, "request body size in MiB (413 above); unset: the largest "
                                     "legal request for the served model's input (largest_request_bytes: an .npz "
                                     "of MAX_NPZ_IMAGES images, or an /evaluate JSON of MAX_IMAGES images, plus "
                                     "64 KiB), 75.6 MiB for 28x28 images", _positive_float)
    max_concurrency: int = _var("MAX_CONCURRENCY", 256, "requests in flight in the whole service, all workers "
                                "together (429 with Retry-After above it)", _positive_int)
    heavy_concurrency: int = _var("HEAVY_CONCURRENCY", 2, "concurrent /evaluate and /evaluate_npz per worker (429 "
                                  "with Retry-After above it)", _positive_int)
    body_timeout_s: float = _var("BODY_TIMEOUT_S", 10, "seconds a request body may pause between two chunks "
                                 "(408 after; the guard reads every body before the endpoint runs)", _positive_float)
    body_deadline_s: float = _var("BODY_DEADLINE_S", 60, "seconds a whole request body may take to arrive (408 after)",
                                  _positive_float)
    request_timeout: float = _var("REQUEST_TIMEOUT", 60, "seconds per request (504 after)", _positive_float)
    torch_threads: int = _var("TORCH_THREADS", 1, "intra-op threads per worker on the CPU (torch's or onnxruntime's)",
                              _positive_int)
    backend: str = _var("BACKEND", "auto", "what computes the probabilities: onnx (onnxruntime on the version's "
                        "model.onnx; 2 to 10x faster than torch on the CPU in bench/onnx_backend.py), torch, or auto "
                        "(onnx on the CPU when the version has a model.onnx, else torch; torch on a GPU)", _backend)
    reload_poll_s: float = _var("RELOAD_POLL_S", 2, "seconds between checks for a newly promoted version (0: off)",
                                _non_negative_float)
    load_retry_max_s: float = _var("LOAD_RETRY_MAX_S", 30, "a worker whose model failed to load retries after 1 s, "
                                   "doubling up to this many seconds (503 on /readyz meanwhile)", _positive_float)
    tracing: bool = _var("TRACING", False, "1: OpenTelemetry spans on the API routes too (they cost ~20% of a small "
                         "request)", _flag)
    port: int = _var("PORT", 3000, "HTTP port of `python -m service.cli serve`", _port)
    host: str = _var("HOST", "0.0.0.0", "address `python -m service.cli serve` listens on", _text)
    challenger: str | None = _var("CHALLENGER", "challenger", "a version (pinned) or an alias (followed like the "
                                  "champion) of MODEL_NAME served beside the champion; the default: the challenger "
                                  "alias when it is set; '' or none: no challenger (service/rollout.py)", _challenger)
    canary_percent: float = _var("CANARY_PERCENT", 0, "percent of /predict and /predict_image requests the "
                                 "challenger answers, drawn per request (0..100)", _percent)
    shadow: bool = _var("SHADOW", False, "1: the challenger also classifies the images of the champion's /predict "
                        "and /predict_image answers, off the response path (imgclf_shadow_agreement_total)", _flag)

    @property
    def max_body_bytes(self) -> int:
        """The body limit before a model is loaded: MAX_BODY_MB, or the largest legal request of 28x28 images."""
        return self.body_limit(*_BEFORE_A_MODEL)

    @property
    def max_json_body_bytes(self) -> int:
        """The same for the JSON routes (/predict, /evaluate, v2 infer): their largest legal body."""
        return self.body_limit(*_BEFORE_A_MODEL, json_only=True)

    def body_limit(self, shape: tuple[int, int, int], num_classes: int, json_only: bool = False) -> int:
        """The body limit for a model of input `shape` (C, H, W): MAX_BODY_MB, or else the largest legal request
        (json_only: of the JSON routes, whose bodies are parsed whole; an upload route takes the .npz's size)."""
        if self.max_body_mb is not None:
            return int(self.max_body_mb * 1024 * 1024)
        return largest_request_bytes(shape, num_classes, self.max_images, 0 if json_only else self.max_npz_images)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """The settings from `environ`; every invalid variable is named in one SettingsError."""
        values, problems = {}, []
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as e:
                problems.append(f"{f.metadata['env']} must be {e}, got {raw!r}")
        if problems:
            raise SettingsError("; ".join(problems))
        return cls(**values)


_BEFORE_A_MODEL = ((1, 28, 28), 10)  # input shape and class count the limits assume until a model is loaded
ENVELOPE_BYTES = 64 * 1024  # multipart boundaries and part headers, zip and .npy headers: well under this


def largest_request_bytes(shape: tuple[int, int, int], num_classes: int, max_images: int, max_npz_images: int) -> int:
    """The largest legal request body for images of `shape` (C, H, W), plus ENVELOPE_BYTES: the larger of
    an /evaluate_npz upload of `max_npz_images` uint8 images with int64 labels (numpy.savez, uncompressed)
    and an /evaluate JSON body of `max_images` images of pixel value 255 with the largest labels, written
    as json.dumps writes it (/predict's body, with top_k instead of labels, is smaller)."""
    c, h, w = shape
    pixels = c * h * w
    npz = max_npz_images * (pixels + 8)  # 0 when only the JSON routes count
    image = [[[255] * w] * h] * c if c > 1 else [[255] * w] * h
    one, label = len(json.dumps(image)), len(str(num_classes - 1))
    evaluate = len('{"images": [], "labels": []}') + max_images * (one + 2 + label + 2)
    return max(npz, evaluate) + ENVELOPE_BYTES


def read() -> Settings:
    """The settings in the environment now (`python -m service.cli serve` checks them before BentoML starts)."""
    return Settings.from_env(os.environ)


@functools.cache
def get() -> Settings:
    """The process's settings, read from the environment on first use."""
    return read()


def describe() -> str:
    """One line per variable: name, default, meaning (the `--help` of `python -m service.cli serve`)."""
    def shown(default) -> str:
        return "unset" if default is None else str(int(default)) if isinstance(default, bool) else str(default)

    return "\n".join(f"  {f.metadata['env']:<16}{shown(f.default):<10} {f.metadata['meaning']}"
                     for f in fields(Settings))


def serve_environment(root: Path) -> dict[str, str]:
    """The environment `bentoml serve` runs in: this process's, with the project on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def limits_in_force(settings: Settings, service: str) -> dict:
    """The limits this worker enforces. The service's own come from `settings` (MAX_CONCURRENCY is counted
    over all workers by the guard, service/admission.py); the request timeout and the worker count from
    BentoML's merged configuration, read the way _bentoml_impl/server/app.py reads it, and BentoML's own
    per-worker concurrency limit, which the service leaves unset, only if its configuration sets one.
    Call it in a worker, after BentoML has loaded its configuration."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.resource import system_resources

    config = BentoMLContainer.config.services[service].get()
    traffic = config.get("traffic") or {}
    workers = config.get("workers") or 1
    if workers == "cpu_count":
        workers = int(system_resources()["cpu"])
    own = traffic.get("max_concurrency")
    return {"max_images": settings.max_images, "max_npz_images": settings.max_npz_images,
            "max_body_bytes": settings.max_body_bytes,
            "max_json_body_bytes": settings.max_json_body_bytes,
            "max_concurrency": settings.max_concurrency,
            "heavy_concurrency_per_worker": settings.heavy_concurrency,
            "bentoml_max_concurrency_per_worker": math.ceil(own / max(workers, 1)) if own else None,
            "workers": workers,
            "request_timeout_s": float(traffic["timeout"])}
