"""The BentoML service: one class, the model loaded and verified in __init__, one typed method per endpoint.

Settings: service/settings.py (environment variables, read once at start-up). Routes: service/routes.py.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import threading
import time
import typing
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
import torch
from bentoml._internal.context import server_context
from pydantic import BaseModel, Field, WithJsonSchema, create_model
from starlette.responses import JSONResponse

from core import artifacts, registry
from core.manifest import DatasetRecord, InputSpec, ModelSpec, OfflineMetrics
from core.models import pick_device
from service import balance, metric_paths, metrics, paired, placement, recovery, rollout, settings, store, v2
from service.guard import STATE, FastRoute, Guard
from service.inference import (
    DEFAULT_TOP_K,
    MAX_TOP_K,
    Classifier,
    InputError,
    decode_image_file,
    parse_images,
    parse_labels,
    parse_npz,
    parse_predict_request,
    parse_top_k,
)
from service.routes import EVALUATE, EVALUATE_NPZ, MODEL_INFO, PREDICT, PREDICT_IMAGE, ROUTES, Route

log = logging.getLogger("imgclf")
log.setLevel(logging.INFO)  # BentoML's root handler passes WARNING+ only; our start-up lines are INFO
SRC = Path(__file__).resolve().parent.parent  # the checkout, or a built Bento's src/
NAME = "imgclf"
try:
    SETTINGS = settings.get()
except settings.SettingsError as e:
    raise SystemExit(f"imgclf: {e}") from None
PLACEMENT = placement.detect(SETTINGS)  # worker count and GPUs (service/placement.py)


def choose_version() -> tuple[str, str, str | None]:
    """(artifacts dir, model name, version or None); a built Bento serves exactly the model it carries."""
    return store.bento_model(SRC) or (SETTINGS.artifacts_dir, SETTINGS.model_name, SETTINGS.model_version)


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


# the comparison block: the fields of `python -m training compare` (core.registry.Comparison), less those
# that only an offline comparison has (the model name, the dataset, where the predictions came from, notes)
PairedComparison = create_model(
    "PairedComparison", __doc__="The paired figures of champion (a) and challenger (b) on the batch.",
    **{name: (hint, ...) for name, hint in typing.get_type_hints(registry.Comparison).items()
       if name not in ("name", "dataset", "predictions", "notes")})


class PairedEvaluateAnswer(EvaluateAnswer):
    """With `compare`: the champion's evaluation, the challenger's, and the paired comparison."""
    challenger: EvaluateAnswer | None = None
    comparison: PairedComparison | None = None


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
    backend: str  # torch or onnx (BACKEND; service/backends.py)
    limits: dict


Images = Annotated[list[Any], Field(description="H x W lists of pixel values 0..255 (C x H x W for colour models)",
                                    examples=[[[[0] * 28] * 28]])]
Labels = Annotated[list[Any], Field(description="one integer class index per image", examples=[[9]])]
# passed on as sent: parse_top_k checks it, the same on BentoML's route and on the guard's fast path
TopK = Annotated[Any, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_TOP_K,
                                      "description": "how many of the most likely classes each answer lists"})]
# passed on as sent: paired.parse_compare checks it (a JSON boolean; "true", "false", "1", "0" in a form)
Compare = Annotated[Any, WithJsonSchema({"type": "boolean", "default": False,
                                         "description": "also evaluate the challenger on the same images and add "
                                                        "`challenger` and the paired `comparison`"})]


def unready_answer() -> JSONResponse:
    reason = STATE.load_reason or "loading"
    return JSONResponse({"error": f"model not loaded: {STATE.load_error or 'still loading'}", "reason": reason,
                         "model_version": None}, status_code=503, headers={"x-imgclf-reason": reason})


def refusal_answer(model: Classifier, e: InputError) -> JSONResponse:
    return JSONResponse({"error": str(e), "reason": e.reason, "model_version": model.version},
                        status_code=e.status, headers={"x-imgclf-reason": e.reason})


def with_model(method):
    """The preamble of every endpoint, written once: 503 while no model is loaded, an InputError answered as
    a refusal. The method gets the current model as its first argument, taken once, so the answer names the
    version that computed it even when a reload swaps the model meanwhile; BentoML sees the signature
    without it."""
    params = list(inspect.signature(method).parameters.values())
    assert params[1].name == "model", method

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def endpoint(self, *args, **kwargs):
            if (model := self.model) is None:
                return unready_answer()
            try:
                return await method(self, model, *args, **kwargs)
            except InputError as e:
                return refusal_answer(model, e)
    else:
        @functools.wraps(method)
        def endpoint(self, *args, **kwargs):
            if (model := self.model) is None:
                return unready_answer()
            try:
                return method(self, model, *args, **kwargs)
            except InputError as e:
                return refusal_answer(model, e)

    endpoint.__signature__ = inspect.signature(method).replace(parameters=[params[0], *params[2:]])
    return endpoint


@bentoml.service(
    name=NAME,
    workers=PLACEMENT.workers,
    resources=PLACEMENT.resources,
    # no BentoML max_concurrency: it would refuse per worker; the guard bounds the whole service (admission.py)
    traffic={"timeout": SETTINGS.request_timeout},
    logging={"access": {"enabled": False}},
    # OpenTelemetry spans cost ~20% of a small request; trace the API routes only when asked (TRACING=1)
    tracing={} if SETTINGS.tracing else {"excluded_urls": ",".join([*(path.lstrip("/") for path in ROUTES), "v2/"])},
)
class ImageClassifier:
    def __init__(self) -> None:
        STATE.reset()
        self.limits = settings.limits_in_force(SETTINGS, NAME)  # BentoML's configuration is loaded by now
        self.model: Classifier | None = None
        self.challenger: Classifier | None = None  # served beside the champion (service/rollout.py)
        self.challenger_error: str | None = None  # why the challenger asked for is not served
        self.challenger_source: rollout.ChallengerSource | None = None  # CHALLENGER resolved, once a model loads
        self.shadow = rollout.Shadow()
        self.metrics = metrics.get()
        if not self._load():
            # /livez stays 200 (the process is sound; a restart would find the same files), /readyz answers 503
            # with the reason, and the load is tried again until the files are back: then every worker serves
            threading.Thread(target=self._retry_load, daemon=True, name="imgclf-load").start()

    def _retry_load(self) -> None:
        for delay in recovery.backoff(1, SETTINGS.load_retry_max_s):
            time.sleep(delay)
            if self._load():
                return

    def _load(self) -> bool:
        """Load, verify and serve the chosen version; False, with the reason on /readyz and in the log, if refused."""
        root, name, version = SETTINGS.artifacts_dir, SETTINGS.model_name, SETTINGS.model_version
        try:
            root, name, version = choose_version()
            device = pick_device(placement.worker_device(SETTINGS, PLACEMENT, server_context.worker_index))
            loaded = artifacts.load(root, name, version, device=device)
            model = Classifier(loaded, device, SETTINGS.backend)  # BackendError (a ValueError) when unservable
        except (artifacts.ArtifactError, ValueError, RuntimeError, OSError, bentoml.exceptions.BentoMLException) as e:
            # Stay up and say why on /readyz (503; a reason code and a short message) and in the log (the full
            # text, with server paths): a bad version is never served.
            STATE.load_reason, STATE.load_error = recovery.client_reason(e, root)
            log.error("NOT READY: model %s/%s under %s refused: %s", name, version or "(promoted or newest)", root, e)
            return False
        if device.type == "cpu":
            # One intra-op thread per worker: for small models, more threads only spin and contend
            # with the server and the other workers (measured in bench/; README "Benchmarks").
            torch.set_num_threads(SETTINGS.torch_threads)
        self.model = model
        self._size_bodies(self.model)
        self._announce(name, self.model)
        self.model.warm_up()
        # The model and the framework are loaded for good: move them out of the collector's reach,
        # so full collections stop scanning them (they caused 100+ ms pauses; see README).
        gc.collect()
        gc.freeze()
        # self.predict.local: once BentoML has set the service up, self.predict is its self-calling proxy
        STATE.fast = {PREDICT.path: FastRoute(ImageClassifier.apis["predict"].input_spec, self.predict.local,
                                              self._parse_predict_body, self._predict_parsed),
                      # /evaluate only for a large body, parsed off the event loop; a small one takes BentoML's route
                      EVALUATE.path: FastRoute(ImageClassifier.apis["evaluate"].input_spec, None,
                                               self._parse_evaluate_body, self._evaluate_parsed)}
        # the Open Inference Protocol v2 routes (service/v2.py): the current model and /predict's batching
        v2.SERVED = v2.Served(lambda: self.model, lambda m, x: m.batcher.probabilities(x))
        self._start_challenger(root, name, SETTINGS.reload_poll_s)  # before ready: a ready service serves both
        STATE.ready = True
        log.info("serving %s/%s on %s with %s (%s)", name, self.model.version, device, self.model.backend,
                 self.model.backend_reason)
        every = SETTINGS.reload_poll_s
        if every > 0 and version is None:  # a pinned MODEL_VERSION or a bundled version never changes
            threading.Thread(target=self._watch_promotions, args=(root, name, every), daemon=True,
                             name="imgclf-reload").start()
        return True

    # --- hot reload ------------------------------------------------------------------------

    def _watch_promotions(self, root: str, name: str, every: float) -> None:
        """Serve a newly promoted version without a restart. `python -m training promote` is the
        trigger (it renames the PROMOTED file atomically); there is no HTTP route for it. The new
        version is verified and warmed up beside the old one, then swapped in with one assignment:
        requests in flight finish on the model they started with (and on its own batcher, which goes
        with it). A version that fails to load is logged and skipped, the old one keeps serving
        (rollout.watch: retried when its files change, else after a backoff)."""
        rollout.watch(root, name, every, target=lambda: artifacts.promoted(root, name) or self.model.version,
                      current=lambda: self.model, load=lambda v: rollout.load_version(
                          root, name, v, self.model.device, SETTINGS.backend),
                      swap=functools.partial(self._serve_champion, name),
                      refused=functools.partial(self._champion_refused, root, name))

    def _serve_champion(self, name: str, new: Classifier) -> None:
        self._size_bodies(new)
        old, self.model = self.model, new
        STATE.reload_error = None
        self._announce(name, new, old)
        if self.challenger is not None:
            metrics.record_pair(new.version, self.challenger.version)
        gc.collect()
        gc.freeze()
        log.info("reloaded: now serving %s/%s (was %s)", name, new.version, old.version)

    def _champion_refused(self, root: str, name: str, target: str, e: BaseException) -> None:
        reason, message = recovery.client_reason(e, root)
        STATE.reload_error = (f"promoted version {name}/{target} refused ({reason}: {message}); "
                              f"still serving {self.model.version}")
        log.error("RELOAD FAILED: promoted version %s/%s refused, still serving %s: %s",
                  name, target, self.model.version, e)

    # --- the challenger (service/rollout.py) -----------------------------------------------

    def _start_challenger(self, root: str, name: str, every: float) -> None:
        """Load CHALLENGER beside the champion, then follow its alias (a pinned version never changes)."""
        self.challenger_source = source = rollout.ChallengerSource(
            str(root), name, SETTINGS.challenger, SETTINGS.challenger == settings.Settings.challenger)
        load = functools.partial(self._load_challenger, root, name)
        try:
            version = source.version()
        except (artifacts.ArtifactError, OSError) as e:
            version, self.challenger_error = None, f"CHALLENGER {source.setting!r} cannot be read: " + ": ".join(
                recovery.client_reason(e, root))
        if version is None:
            self.challenger_error = self.challenger_error or source.unset_error()
        else:
            try:
                self._serve_challenger(name, load(version))
            except Exception as e:  # noqa: BLE001 - a challenger that fails never serves; the champion does
                self._challenger_refused(root, name, version, e)
        if every > 0 and source.setting is not None and not source.pinned:
            threading.Thread(target=rollout.watch, daemon=True, name="imgclf-reload-challenger",
                             args=(root, name, every, source.version, lambda: self.challenger, load,
                                   functools.partial(self._serve_challenger, name),
                                   functools.partial(self._challenger_refused, root, name))).start()

    def _load_challenger(self, root: str, name: str, version: str) -> Classifier:
        return rollout.load_version(root, name, version, self.model.device, SETTINGS.backend, like=self.model)

    def _serve_challenger(self, name: str, new: Classifier | None) -> None:
        old, self.challenger, self.challenger_error = self.challenger, new, None
        if new is not None:
            self._announce(name, new, old)
            metrics.record_pair(self.model.version, new.version)
        elif old is not None:
            if old.version != self.model.version:
                self.metrics.model_info.labels(name, old.version).set(0)
            self.challenger_error = self.challenger_source.unset_error()
        gc.collect()
        gc.freeze()
        log.info("challenger: now %s/%s (was %s)", name, new.version if new else None, old.version if old else None)

    def _challenger_refused(self, root: str, name: str, version: str, e: BaseException) -> None:
        reason, message = recovery.client_reason(e, root)
        served = self.challenger.version if self.challenger else None
        self.challenger_error = f"challenger version {name}/{version} refused ({reason}: {message}); serving {served}"
        log.error("CHALLENGER REFUSED: %s/%s refused, challenger served: %s: %s", name, version, served, e)

    # --- helpers ---------------------------------------------------------------------------

    def _size_bodies(self, model: Classifier) -> None:
        """The body limit for this model's input: MAX_BODY_MB, or its largest legal request (service/settings.py)."""
        STATE.max_body_bytes = SETTINGS.body_limit(model.spec.shape, len(model.classes))
        # JSON bodies are parsed whole (small ones on the event loop): they get the JSON routes' own bound
        STATE.max_json_body_bytes = SETTINGS.body_limit(model.spec.shape, len(model.classes), json_only=True)
        self.limits = {**self.limits, "max_body_bytes": STATE.max_body_bytes,
                       "max_json_body_bytes": STATE.max_json_body_bytes}

    def _announce(self, name: str, model: Classifier, old: Classifier | None = None) -> None:
        """The served version's metrics: its offline accuracy, and imgclf_model_info 1 (0 for `old`)."""
        self.metrics.offline_accuracy.labels(model.version).set(model.loaded.manifest.metrics.test_accuracy)
        self.metrics.model_info.labels(name, model.version).set(1)
        metrics.record_offline(model.version, model.classes, model.loaded.manifest.metrics)
        served = {m.version for m in (self.model, self.challenger) if m is not None}
        if old is not None and old.version not in served:
            self.metrics.model_info.labels(name, old.version).set(0)

    async def _predict(self, model: Classifier, route: Route, x: np.ndarray, top_k: int) -> JSONResponse:
        # the champion, the challenger for a canary share, or the version the request pins (service/rollout.py)
        model, shadow = rollout.choose(model, self.challenger, SETTINGS.canary_percent, SETTINGS.shadow)
        t = time.perf_counter()
        preds = model.answers(await model.batcher.probabilities(x), top_k)
        m, child = self.metrics, metrics.child
        child(m.latency, route.path, model.version).observe(time.perf_counter() - t)
        child(m.batch_size, route.path).observe(len(x))
        for p in preds:
            child(m.predictions, model.version, p["class_name"]).inc()
        if shadow is not None:
            self.shadow.submit(model.version, [p["label"] for p in preds], shadow, x)
        return JSONResponse({"model_version": model.version, "predictions": preds})

    def _parse_predict_body(self, body: bytes) -> tuple[dict, bytes]:
        """A large /predict body -> (header, uint8 pixels), computed in a child process (service/offload.py):
        the same checks as `predict`; a body BentoML's input model refuses raises (BentoML's route answers)."""
        model = self.model
        inputs = ImageClassifier.apis["predict"].input_spec.model_validate_json(body)
        try:
            x, top_k = parse_predict_request({"images": inputs.images, "top_k": inputs.top_k}, model.spec,
                                             len(model.classes))
        except InputError as e:
            return e.header(), b""
        return {"shape": list(x.shape), "top_k": top_k}, x.tobytes()

    @with_model
    async def _predict_parsed(self, model: Classifier, header: dict, payload: bytes) -> JSONResponse:
        """`predict`'s answer from what _parse_predict_body computed."""
        InputError.raise_carried(header)
        x = np.frombuffer(bytearray(payload), np.uint8).reshape(header["shape"])
        return await self._predict(model, PREDICT, x, header["top_k"])

    def _parse_evaluate_body(self, body: bytes) -> tuple[dict, bytes]:
        """A large /evaluate body -> (header, uint8 pixels + int64 labels), computed in a child process
        (service/offload.py): `evaluate`'s checks in its order (compare, then images and labels, whose refusal
        waits for the parent's challenger check); a body BentoML's input model refuses raises."""
        model = self.model
        inputs = ImageClassifier.apis["evaluate"].input_spec.model_validate_json(body)
        try:
            compare = paired.parse_compare(inputs.compare)
        except InputError as e:
            return e.header(), b""
        try:
            x = parse_images(inputs.images, model.spec)
            y = parse_labels(inputs.labels, len(x), len(model.classes))
        except InputError as e:
            return {"compare": compare, **e.header()}, b""
        return {"compare": compare, "shape": list(x.shape)}, x.tobytes() + y.astype(np.int64).tobytes()

    @with_model
    async def _evaluate_parsed(self, model: Classifier, header: dict, payload: bytes) -> JSONResponse:
        """`evaluate`'s answer from what _parse_evaluate_body computed, computed on a thread as BentoML runs it."""
        challenger = self._challenger(model, header["compare"]) if "compare" in header else None
        InputError.raise_carried(header)
        pixels = int(np.prod(header["shape"]))
        x = np.frombuffer(bytearray(payload[:pixels]), np.uint8).reshape(header["shape"])
        y = np.frombuffer(bytearray(payload[pixels:]), np.int64)
        return await anyio.to_thread.run_sync(self._evaluate, model, EVALUATE, x, y, challenger)

    def _challenger(self, model: Classifier, compare: bool) -> Classifier | None:
        """The challenger a `compare` request pairs with the champion (taken once, like the champion), or None."""
        return paired.challenger_for(model, self.challenger) if compare else None

    def _evaluate(self, model: Classifier, route: Route, x: np.ndarray, y: np.ndarray,
                  challenger: Classifier | None = None) -> JSONResponse:
        t = time.perf_counter()
        answer = model.evaluate(x, y) if challenger is None else paired.paired_evaluation(model, challenger, x, y)
        m = self.metrics
        m.latency.labels(route.path, model.version).observe(time.perf_counter() - t)
        m.batch_size.labels(route.path).observe(len(x))
        for block in (answer,) if challenger is None else (answer, answer["challenger"]):  # each under its version
            version = block["model_version"]
            m.evaluated.labels(version).inc(block["n"])
            m.evaluated_correct.labels(version).inc(metrics.correct_of(block["confusion_matrix"]))
            m.evaluation_accuracy.labels(version).set(block["accuracy"])
        return JSONResponse(answer)

    # --- endpoints (the guard's fast path calls `predict` directly with what BentoML's input model accepted)

    @bentoml.api(route=PREDICT.path)
    @with_model
    async def predict(self, model: Classifier, images: Images, top_k: TopK = DEFAULT_TOP_K) -> PredictAnswer:
        """Classify a batch of images: argmax class, its probability and the top-k classes."""
        x, top_k = parse_predict_request({"images": images, "top_k": top_k}, model.spec, len(model.classes))
        return await self._predict(model, PREDICT, x, top_k)

    @bentoml.api(route=PREDICT_IMAGE.path)
    @with_model
    async def predict_image(self, model: Classifier, file: Annotated[Path, Field(description="a PNG or JPEG file")],
                            top_k: TopK = DEFAULT_TOP_K) -> PredictAnswer:
        """Classify one uploaded PNG or JPEG image (multipart field `file`), converted to the model's input."""
        top_k = parse_top_k(top_k, len(model.classes))
        return await self._predict(model, PREDICT_IMAGE, decode_image_file(file.read_bytes(), model.spec), top_k)

    @bentoml.api(route=EVALUATE.path)
    @with_model
    def evaluate(self, model: Classifier, images: Images, labels: Labels,
                 compare: Compare = False) -> PairedEvaluateAnswer:
        """Accuracy, confusion matrix and per-class figures of labelled images, beside the offline test accuracy;
        with `compare`, the challenger's too and their paired comparison."""
        challenger = self._challenger(model, paired.parse_compare(compare))
        x = parse_images(images, model.spec)
        y = parse_labels(labels, len(x), len(model.classes))
        return self._evaluate(model, EVALUATE, x, y, challenger)

    @bentoml.api(route=EVALUATE_NPZ.path)
    @with_model
    def evaluate_npz(self, model: Classifier,
                     file: Annotated[Path, Field(description=".npz with uint8 `images` (N, H, W) and integer "
                                                             "`labels` (N,)")],
                     compare: Compare = False) -> PairedEvaluateAnswer:
        """The same as /evaluate for large batches: one .npz upload (multipart field `file`), never unpickled."""
        challenger = self._challenger(model, paired.parse_compare(compare, form=True))
        x, y = parse_npz(file.read_bytes(), model.spec, len(model.classes))
        return self._evaluate(model, EVALUATE_NPZ, x, y, challenger)

    @bentoml.api(route=MODEL_INFO.path)
    @with_model
    async def model_info(self, model: Classifier) -> ModelInfo:
        """Name, version, classes, input spec and the offline metrics of the served version."""
        m = model.loaded.manifest
        info = ModelInfo(name=m.name, model_version=m.version, created_at=m.created_at, architecture=m.model,
                         classes=list(m.classes), input=m.input, dataset=m.dataset, offline_metrics=m.metrics,
                         offline_test_n=m.metrics.n, offline_test_correct=m.metrics.correct,
                         verdict=m.training.verdict, device=str(model.device), backend=model.backend,
                         limits=self.limits)
        # reload_error: null, or why the last promoted version was refused (beside the typed answer: BentoML's
        # OpenAPI conversion would document an optional string as a plain string)
        return JSONResponse(info.model_dump(mode="json") | {
            "reload_error": STATE.reload_error, "canary_percent": SETTINGS.canary_percent, "shadow": SETTINGS.shadow,
            "challenger": rollout.info(self.challenger_source, self.challenger, self.challenger_error)})


assert {api.route for api in ImageClassifier.apis.values()} == set(ROUTES), "service/routes.py lists every API"
ImageClassifier.add_asgi_middleware(Guard)
metric_paths.install()  # BentoML's request metrics label an unknown path as one "(other)"
balance.install()  # each worker takes its share of the connections (service/balance.py)
