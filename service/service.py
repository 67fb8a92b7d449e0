"""The BentoML service: one class, the model loaded and verified in __init__, one typed method per endpoint.

Settings (environment variables, read at start-up):
    ARTIFACTS_DIR   artifacts               where versions live (a built Bento uses its bundled copy)
    MODEL_NAME      cnn                     which model
    MODEL_VERSION   promoted, else newest   which version
    DEVICE          auto                    auto | cpu | cuda
    WORKERS         cpu_count               worker processes (a number, or cpu_count: one per core)
    MAX_IMAGES      1024                    images per JSON request (413 above)
    MAX_NPZ_IMAGES  100000                  images per .npz upload (413 above)
    MAX_BODY_MB     64                      request body size (413 above)
    MAX_CONCURRENCY 256                     requests in flight per worker (429 above)
    REQUEST_TIMEOUT 60                      seconds per request (504 after)
    TORCH_THREADS   1                       torch intra-op threads per worker (CPU)
    RELOAD_POLL_S   2                       seconds between checks for a newly promoted version (0: off)
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import torch
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from core import artifacts
from core.manifest import DatasetRecord, InputSpec, ModelSpec, OfflineMetrics
from core.models import pick_device
from service import metrics
from service.guard import Guard, STATE
from service.inference import Batcher, Classifier, InputError, decode_image_file, parse_images, parse_labels, parse_npz

log = logging.getLogger("imgclf")
log.setLevel(logging.INFO)  # BentoML's root handler passes WARNING+ only; our start-up lines are INFO
BUNDLE = Path(__file__).resolve().parent.parent / "bundle"
DEVICE = os.environ.get("DEVICE", "auto")
_WANTS_GPU = DEVICE.startswith("cuda") or (DEVICE == "auto" and torch.cuda.is_available())


def _env_number(name: str, default, cast=int):
    try:
        return cast(os.environ.get(name, default))
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {os.environ.get(name)!r}") from None


def _workers() -> int | str:
    value = os.environ.get("WORKERS", "cpu_count")
    return value if value == "cpu_count" else _env_number("WORKERS", 1)


def choose_version() -> tuple[str, str, str | None]:
    """(artifacts dir, model name, version or None); a built Bento serves exactly its bundled version."""
    bundle = BUNDLE / "bundle.json"
    if bundle.is_file():
        b = json.loads(bundle.read_text())
        return str(BUNDLE / "artifacts"), b["name"], b["version"]
    return (os.environ.get("ARTIFACTS_DIR", "artifacts"), os.environ.get("MODEL_NAME", "cnn"),
            os.environ.get("MODEL_VERSION") or None)


# --- answer models (what /docs.json shows; the answers themselves are built as plain dicts) ---

class Ranked(BaseModel):
    label: int
    class_name: str
    probability: float


class Prediction(Ranked):
    top_k: list[Ranked]


class PredictAnswer(BaseModel):
    model_version: str
    predictions: list[Prediction]


class PerClass(BaseModel):
    label: int
    class_name: str
    precision: float
    recall: float
    f1: float
    support: int


class ConsistencyTest(BaseModel):
    test: str
    alpha: float
    p_value: float


class EvaluateAnswer(BaseModel):
    model_version: str
    n: int
    accuracy: float
    accuracy_ci95: list[float]
    confusion_matrix: list[list[int]]
    per_class: list[PerClass]
    offline_test_accuracy: float
    offline_test_n: int
    consistent_with_offline: bool
    consistency_test: ConsistencyTest


class ModelInfo(BaseModel):
    """The served version, its blocks typed by the manifest's own records (core/manifest.py)."""
    name: str
    model_version: str
    created_at: str
    architecture: ModelSpec
    classes: list[str]
    input: InputSpec
    dataset: DatasetRecord
    offline_metrics: OfflineMetrics
    offline_test_n: int
    offline_test_correct: int
    verdict: dict
    device: str
    limits: dict
    reload_error: str | None = None


Images = Annotated[list[Any], Field(description="H x W lists of pixel values 0..255 (C x H x W for colour models)",
                                    examples=[[[[0] * 28] * 28]])]
Labels = Annotated[list[Any], Field(description="one integer class index per image", examples=[[9]])]


@bentoml.service(
    name="imgclf",
    workers=_workers(),
    resources={"gpu": 1} if _WANTS_GPU else {"cpu": "1"},
    traffic={"timeout": _env_number("REQUEST_TIMEOUT", 60, float),
             "max_concurrency": _env_number("MAX_CONCURRENCY", 256)},
    logging={"access": {"enabled": False}},
    # OpenTelemetry spans cost ~20% of a small request; trace only when asked (TRACING=1)
    tracing={} if os.environ.get("TRACING") == "1" else {"excluded_urls": "predict,evaluate,model_info"},
)
class ImageClassifier:
    def __init__(self) -> None:
        root, name, version = choose_version()
        STATE.reset()
        try:
            device = pick_device(DEVICE)
            loaded = artifacts.load(root, name, version, device=device)
        except (artifacts.ArtifactError, ValueError, RuntimeError, OSError) as e:
            # Stay up and say why on /readyz (503) and in the log: a bad version is never served.
            STATE.load_error = f"model {name}/{version or '(promoted or newest)'} under {root} refused: {e}"
            log.error("NOT READY: %s", STATE.load_error)
            self.model = None
            return
        if device.type == "cpu":
            # One intra-op thread per worker: for small models, more threads only spin and contend
            # with the server and the other workers (measured in bench/; README "Benchmarks").
            torch.set_num_threads(_env_number("TORCH_THREADS", 1))
        self.model = Classifier(loaded, device)
        self.batchers = {self.model.version: Batcher(self.model)}  # adaptive batching of /predict
        self.metrics = metrics.get()
        self._announce(name, self.model)
        self.model.warm_up()
        # The model and the framework are loaded for good: move them out of the collector's reach,
        # so full collections stop scanning them (they caused 100+ ms pauses; see README).
        gc.collect()
        gc.freeze()
        STATE.predict = self.predict
        STATE.ready = True
        log.info("serving %s/%s on %s", name, self.model.version, device)
        every = _env_number("RELOAD_POLL_S", 2.0, float)
        if every > 0 and version is None:  # a pinned MODEL_VERSION or a bundled version never changes
            threading.Thread(target=self._watch_promotions, args=(root, name, every), daemon=True,
                             name="imgclf-reload").start()

    # --- hot reload ------------------------------------------------------------------------

    def _watch_promotions(self, root: str, name: str, every: float) -> None:
        """Serve a newly promoted version without a restart. `python -m training promote` is the
        trigger (it renames the PROMOTED file atomically); there is no HTTP route for it. The new
        version is verified and warmed up beside the old one, then swapped in with one assignment:
        requests in flight finish on the model they started with. A version that fails to load is
        logged and skipped; the old one keeps serving."""
        failed: str | None = None
        while True:
            time.sleep(every)
            try:
                target = artifacts.promoted(root, name)
            except (artifacts.ArtifactError, OSError):
                continue
            if target is None or target == self.model.version or target == failed:
                continue
            try:
                new = Classifier(artifacts.load(root, name, target, device=self.model.device), self.model.device)
                new.warm_up()
            except Exception as e:  # noqa: BLE001 - whatever went wrong, the old version keeps serving
                failed = target
                STATE.reload_error = f"promoted version {name}/{target} refused, still serving {self.model.version}: {e}"
                log.error("RELOAD FAILED: %s", STATE.reload_error)
                continue
            self.batchers[new.version] = Batcher(new)
            old, self.model = self.model, new
            # requests that took the old model finish on its batcher; it is dropped after a grace period
            threading.Timer(60, self.batchers.pop, args=(old.version, None)).start()
            failed, STATE.reload_error = None, None
            self._announce(name, new, old)
            gc.collect()
            gc.freeze()
            log.info("reloaded: now serving %s/%s (was %s)", name, new.version, old.version)

    # --- helpers ---------------------------------------------------------------------------

    def _announce(self, name: str, model: Classifier, old: Classifier | None = None) -> None:
        """The served version's metrics: its offline accuracy, and imgclf_model_info 1 (0 for `old`)."""
        self.metrics.offline_accuracy.labels(model.version).set(model.loaded.manifest.metrics.test_accuracy)
        self.metrics.model_info.labels(name, model.version).set(1)
        if old is not None:
            self.metrics.model_info.labels(name, old.version).set(0)

    def _refuse(self, model: Classifier, e: InputError) -> JSONResponse:
        return JSONResponse({"error": str(e), "reason": e.reason, "model_version": model.version},
                            status_code=e.status, headers={"x-imgclf-reason": e.reason})

    def _unready(self) -> JSONResponse:
        return JSONResponse({"error": f"model not loaded: {STATE.load_error}", "model_version": None}, status_code=503)

    async def _predict(self, model: Classifier, endpoint: str, x: np.ndarray, top_k: int) -> JSONResponse:
        model.check_top_k(top_k)
        t = time.perf_counter()
        preds = model.answers(await self.batchers[model.version].probabilities(x), top_k)
        m = self.metrics
        m.latency.labels(endpoint, model.version).observe(time.perf_counter() - t)
        m.batch_size.labels(endpoint).observe(len(x))
        for p in preds:
            m.predictions.labels(model.version, p["class_name"]).inc()
        return JSONResponse({"model_version": model.version, "predictions": preds})

    def _evaluate(self, model: Classifier, endpoint: str, x: np.ndarray, y: np.ndarray) -> JSONResponse:
        t = time.perf_counter()
        answer = model.evaluate(x, y)
        m = self.metrics
        m.latency.labels(endpoint, model.version).observe(time.perf_counter() - t)
        m.batch_size.labels(endpoint).observe(len(x))
        m.evaluated.labels(model.version).inc(answer["n"])
        m.evaluation_accuracy.labels(model.version).set(answer["accuracy"])
        return JSONResponse(answer)

    # --- endpoints: each takes the current model once, so its answer names the version that computed it

    @bentoml.api(route="/predict")
    async def predict(self, images: Images, top_k: int = 3) -> PredictAnswer:
        """Classify a batch of images: argmax class, its probability and the top-k classes."""
        model = self.model
        if model is None:
            return self._unready()
        try:
            return await self._predict(model, "/predict", parse_images(images, model.spec), top_k)
        except InputError as e:
            return self._refuse(model, e)

    @bentoml.api(route="/predict_image")
    async def predict_image(self, file: Annotated[Path, Field(description="a PNG or JPEG file")],
                            top_k: int = 3) -> PredictAnswer:
        """Classify one uploaded PNG or JPEG image (multipart field `file`), converted to the model's input."""
        model = self.model
        if model is None:
            return self._unready()
        try:
            return await self._predict(model, "/predict_image", decode_image_file(file.read_bytes(), model.spec),
                                       top_k)
        except InputError as e:
            return self._refuse(model, e)

    @bentoml.api(route="/evaluate")
    def evaluate(self, images: Images, labels: Labels) -> EvaluateAnswer:
        """Accuracy, confusion matrix and per-class figures of labelled images, beside the offline test accuracy."""
        model = self.model
        if model is None:
            return self._unready()
        try:
            x = parse_images(images, model.spec)
            y = parse_labels(labels, len(x), len(model.classes))
            return self._evaluate(model, "/evaluate", x, y)
        except InputError as e:
            return self._refuse(model, e)

    @bentoml.api(route="/evaluate_npz")
    def evaluate_npz(self, file: Annotated[Path, Field(description=".npz with uint8 `images` (N, H, W) and "
                                                                    "integer `labels` (N,)")]) -> EvaluateAnswer:
        """The same as /evaluate for large batches: one .npz upload (multipart field `file`), never unpickled."""
        model = self.model
        if model is None:
            return self._unready()
        try:
            x, y = parse_npz(file.read_bytes(), model.spec, len(model.classes))
            return self._evaluate(model, "/evaluate_npz", x, y)
        except InputError as e:
            return self._refuse(model, e)

    @bentoml.api(route="/model_info")
    async def model_info(self) -> ModelInfo:
        """Name, version, classes, input spec and the offline metrics of the served version."""
        model = self.model
        if model is None:
            return self._unready()
        m = model.loaded.manifest
        info = ModelInfo(name=m.name, model_version=m.version, created_at=m.created_at, architecture=m.model,
                         classes=list(m.classes), input=m.input, dataset=m.dataset, offline_metrics=m.metrics,
                         offline_test_n=m.metrics.n, offline_test_correct=m.metrics.correct,
                         verdict=m.training.verdict, device=str(model.device), limits=STATE.limits(),
                         reload_error=STATE.reload_error)
        return JSONResponse(info.model_dump(mode="json"))


ImageClassifier.add_asgi_middleware(Guard)
