"""Validation and inference, free of BentoML: the service's endpoints are thin wrappers around this.

Every input a client can send ends either in a result or in an InputError whose message says
what was wrong and what is expected; `reason` is a short, fixed label for the metrics.
"""

from __future__ import annotations

import asyncio
import functools
import io
import math
import os
import weakref
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from core import metrics
from core.artifacts import LoadedModel
from core.manifest import InputSpec
from core.models import forward_logits, preprocess, probabilities
from service import backends, settings
from service import metrics as prom

MAX_TOP_K = 10
DEFAULT_TOP_K = 3
# CPU passes up to this many images run on the event loop (Batcher): LeNet takes well under 2 ms for them
INLINE_MAX_IMAGES = 64


class InputError(ValueError):
    """A request the service refuses; `status` is the HTTP code, `reason` a low-cardinality label."""

    def __init__(self, message: str, reason: str = "invalid", status: int = 400):
        super().__init__(message)
        self.status, self.reason = status, reason

    def header(self) -> dict:
        """This refusal as JSON fields, to cross from a child process (service/offload.py) to the worker."""
        return {"refused": str(self), "reason": self.reason, "status": self.status}

    @classmethod
    def raise_carried(cls, header: dict) -> None:
        """Raise the refusal a child's `header` carries (InputError.header), if it carries one."""
        if "refused" in header:
            raise cls(header["refused"], header["reason"], header["status"])


def _type_name(v) -> str:
    names = {bool: "boolean", str: "string", dict: "object", list: "array"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _reject_non_numbers(value, what: str) -> None:
    """Find the first non-number inside nested lists (only called after numpy saw something odd)."""
    stack = [(value, what)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, list):
            stack.extend((x, f"{where}[{i}]") for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"{where} is a {_type_name(v)}; pixel values must be numbers 0..255", "type")


def _depth_and_shape(value, limit: int = 6) -> list[int]:
    shape = []
    v = value
    while isinstance(v, list):
        shape.append(len(v))
        if len(shape) > limit:
            raise InputError(f"images are nested {len(shape)}+ levels deep; expected a list of "
                             "H x W (or C x H x W) pixel lists", "shape")
        if not v:
            break
        v = v[0]
    return shape


def _find_ragged(node, dims: tuple[int, ...], where: str, expected: str) -> None:
    """The first list whose length differs from images[0]'s at the same depth (error path only)."""
    if not dims:
        if isinstance(node, list):
            raise InputError(f"{where} is a list where a pixel value belongs; every image must be {expected}", "shape")
        return  # a leaf: its type is checked by _reject_non_numbers
    if not isinstance(node, list) or len(node) != dims[0]:
        got = f"{len(node)} entries" if isinstance(node, list) else f"a {_type_name(node)}"
        raise InputError(f"{where} has {got} where {dims[0]} were expected (ragged rows?): every image must be "
                         f"{expected}", "shape")
    for j, child in enumerate(node):
        _find_ragged(child, dims[1:], f"{where}[{j}]", expected)


def _regular_uint8(value: list, c: int, h: int, w: int) -> np.ndarray | None:
    """The common request checked and converted in C loops: regular lists of the model's shape ((N, H, W) for
    grey models, (N, C, H, W) for colour ones) holding JSON integers 0..255 only -> writable (N, C, H, W) uint8.
    None for anything else, which parse_images' full checks then answer (numpy's nested-list conversion cost
    more than the rest of /predict's checks together: README "Benchmarks")."""
    level = value
    for size in (h, w) if c == 1 else (c, h, w):
        if set(map(type, level)) != {list} or set(map(len, level)) != {size}:
            return None
        level = list(chain.from_iterable(level))
    if set(map(type, level)) != {int}:  # bool is a type of its own here: JSON true is refused below
        return None
    try:
        pixels = bytearray(level)  # ValueError for a value outside 0..255
    except ValueError:
        return None
    return np.frombuffer(pixels, np.uint8).reshape(len(value), c, h, w)


def parse_images(value, spec: InputSpec, max_images: int | None = None, field: str = "images") -> np.ndarray:
    """JSON `images` -> uint8 array (N, C, H, W), or an InputError that says what is wrong.
    `max_images` defaults to the MAX_IMAGES setting."""
    max_images = settings.get().max_images if max_images is None else max_images
    (c, h, w), expected = spec.shape, spec.describe()
    if value is None:
        raise InputError(f"'{field}' is missing or null; expected a list of {expected} images", "missing")
    if not isinstance(value, list):
        raise InputError(f"'{field}' must be a list of {expected} images, got a {_type_name(value)}", "type")
    if not value:
        raise InputError(f"'{field}' is empty; send at least one {expected} image", "empty")
    if len(value) > max_images:
        raise InputError(f"{len(value)} images in one request; the limit is {max_images} (MAX_IMAGES). "
                         "Split the batch, or use /evaluate_npz for large evaluations", "too_many", 413)
    if (fast := _regular_uint8(value, c, h, w)) is not None:
        return fast
    shape = _depth_and_shape(value)
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None  # ragged: numpy refuses inhomogeneous nesting
    if arr is None or arr.dtype == object:
        for i, img in enumerate(value):
            _find_ragged(img, tuple(shape[1:]), f"{field}[{i}]", expected)
        _reject_non_numbers(value, field)
        # regular and all numbers, yet numpy fell back to objects: integers beyond 64 bits
        raise InputError(f"'{field}' holds integers far outside 0..255; pixel values must be in 0..255", "range")
    if arr.dtype.kind not in "iuf":
        if arr.dtype.kind == "b":
            raise InputError(f"'{field}' holds booleans; pixel values must be numbers 0..255", "type")
        _reject_non_numbers(value, field)
        raise InputError(f"'{field}' holds {arr.dtype} values; pixel values must be numbers 0..255", "type")
    # numpy turns JSON booleans mixed with numbers into 0/1 silently: look at every value's type
    # (map(type) over the flattened lists runs in C: ~15 us for a 28x28 image)
    flat = value
    for _ in range(arr.ndim - 1):
        flat = chain.from_iterable(flat)
    if not set(map(type, flat)) <= {int, float}:
        _reject_non_numbers(value, field)
    if c == 1 and arr.ndim == 3:
        arr = arr[:, None]  # (N, H, W) -> (N, 1, H, W)
    if arr.ndim != 4 or arr.shape[1:] != (c, h, w):
        got = "x".join(map(str, arr.shape[1:])) if arr.ndim > 1 else "scalars"
        hint = f" ({arr.shape[1]} channels; this model takes {c})" if arr.ndim == 4 and arr.shape[2:] == (h, w) else ""
        raise InputError(f"each image must be {expected} pixels; got {got}{hint}", "shape")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"'{field}' contains NaN or Infinity; pixel values must be finite numbers 0..255",
                             "range")
        if (arr != np.round(arr)).any():
            raise InputError(f"'{field}' contains fractional values; pixel values must be whole numbers 0..255",
                             "range")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 255:
        raise InputError(f"pixel values must be in 0..255; got values from {lo} to {hi}", "range")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def parse_top_k(value, num_classes: int) -> int:
    """`top_k` as sent: a JSON integer 1..min(10, classes). Strict: "3", 3.0 and true are refused, whichever
    way the request came in (JSON body or multipart form field)."""
    limit = min(MAX_TOP_K, num_classes)
    if type(value) is not int or not 1 <= value <= limit:
        raise InputError(f"top_k must be an integer 1..{limit}, got {value!r} ({_type_name(value)})", "top_k")
    return value


def parse_predict_request(payload: dict, spec: dict, num_classes: int,
                          max_images: int | None = None) -> tuple[np.ndarray, int]:
    """A /predict body {"images": [...], "top_k": k (optional)} -> (uint8 images (N, C, H, W), top_k).

    The one check of /predict: BentoML's route and the guard's fast path both reach it, so a rule
    added here holds on both."""
    top_k = parse_top_k(payload.get("top_k", DEFAULT_TOP_K), num_classes)
    return parse_images(payload.get("images"), spec, max_images), top_k


def parse_labels(value, n: int, num_classes: int) -> np.ndarray:
    if value is None:
        raise InputError("'labels' is missing or null; expected one integer class index per image", "missing")
    if not isinstance(value, list):
        raise InputError(f"'labels' must be a list of integers, got a {_type_name(value)}", "type")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer() and math.isfinite(v):
                continue
            raise InputError(f"labels[{i}] is {v!r} ({_type_name(v)}); labels must be integer class indices "
                             f"0..{num_classes - 1}", "type")
    if len(value) != n:
        raise InputError(f"{len(value)} labels for {n} images; send exactly one label per image", "count")
    # the range is checked on the JSON numbers themselves: 10**30, 2**63 or 1e19 do not fit an int64
    for i, v in enumerate(value):
        if not 0 <= v < num_classes:
            raise InputError(f"labels[{i}] = {v!r} is out of range; labels are class indices "
                             f"0..{num_classes - 1}", "range")
    return np.asarray(value, dtype=np.int64)


_NPZ_FORMAT = "save with numpy.savez(images=uint8 array, labels=int array)"


def _npy_header(f, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy member, read from its header alone (at most 64 KiB)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=65536)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=65536)
    else:
        raise InputError(f"'{what}' is an .npy of format version {version}; {_NPZ_FORMAT}", "format")
    if dtype.hasobject:
        raise InputError("the .npz holds object arrays, which need unpickling; this service never unpickles. "
                         "Save plain uint8 images and integer labels", "pickle", 400)
    return shape, fortran, dtype


def _npy_data(f, zinfo: zipfile.ZipInfo, shape: tuple[int, ...], fortran: bool, dtype: np.dtype,
              what: str) -> np.ndarray:
    """The array of a member whose header was checked: exactly the bytes the header declares, inflated only
    after the member's declared uncompressed size was found to agree with them."""
    nbytes = math.prod(shape) * dtype.itemsize
    if zinfo.file_size != f.tell() + nbytes:
        raise InputError(f"'{what}' declares {zinfo.file_size} bytes where its header's shape {shape} needs "
                         f"{f.tell() + nbytes}; {_NPZ_FORMAT}", "format")
    data = bytearray(nbytes)  # writable: torch.from_numpy warns on read-only arrays
    if f.readinto(data) != nbytes:
        raise InputError(f"'{what}' is truncated; {_NPZ_FORMAT}", "format")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _check_npz_shapes(images: tuple, labels: tuple, spec: InputSpec, max_images: int) -> None:
    """The images' and labels' (shape, fortran, dtype) headers against the limits, before any data is read."""
    (shape, _, dtype), (lshape, _, ldtype) = images, labels
    c, h, w = spec.shape
    if dtype != np.uint8:
        raise InputError(f"'images' is {dtype}; send uint8 pixels (N, {h}, {w})", "type")
    if not (len(shape) == 4 and shape[1:] == (c, h, w) or c == 1 and len(shape) == 3 and shape[1:] == (h, w)):
        raise InputError(f"'images' has shape {shape}; expected (N, {h}, {w})" +
                         ("" if c == 1 else f" or (N, {c}, {h}, {w})"), "shape")
    n = shape[0]
    if n == 0:
        raise InputError("'images' is empty; send at least one image", "empty")
    if n > max_images:
        raise InputError(f"{n} images in one upload; the limit is {max_images} (MAX_NPZ_IMAGES)", "too_many", 413)
    if ldtype.kind not in "iu" or len(lshape) != 1:
        raise InputError(f"'labels' must be a 1-D integer array; got {ldtype} with shape {lshape}", "type")
    if lshape[0] != n:
        raise InputError(f"{lshape[0]} labels for {n} images; send exactly one label per image", "count")


def _read_npz(data: bytes, spec: InputSpec, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    """The 'images' and 'labels' members of an .npz: headers first, checked, then the data they declare."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {i.filename.removesuffix(".npy"): i for i in z.infolist()}
        missing = {"images", "labels"} - set(members)
        if missing:
            raise InputError(f"the .npz holds {sorted(members)}; it needs arrays 'images' (uint8) and 'labels'",
                             "missing")
        with z.open(members["images"]) as fi, z.open(members["labels"]) as fl:
            headers = _npy_header(fi, "images"), _npy_header(fl, "labels")
            _check_npz_shapes(*headers, spec, max_images)
            return (_npy_data(fi, members["images"], *headers[0], "images"),
                    _npy_data(fl, members["labels"], *headers[1], "labels"))


def parse_npz(data: bytes, spec: InputSpec, num_classes: int,
              max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An .npz upload with uint8 `images` (N, H, W) or (N, C, H, W) and integer `labels` (N,).

    Each member's .npy header (dtype, shape) and its declared uncompressed size are checked against the
    limits before any of its data is inflated, so a zip bomb or a header that declares a huge shape is
    refused at the cost of reading a few hundred bytes. An object array (which would need unpickling) is
    refused from its header; nothing is ever unpickled. `max_images` defaults to the MAX_NPZ_IMAGES setting.
    """
    max_images = settings.get().max_npz_images if max_images is None else max_images
    if not data.startswith(b"PK"):  # every .npz is a zip archive
        what = "a single .npy array" if data.startswith(b"\x93NUMPY") else "not a zip archive"
        raise InputError(f"the upload is {what}; send an .npz made with numpy.savez(images=uint8 array, "
                         "labels=int array)", "format")
    try:
        images, labels = _read_npz(data, spec, max_images)
    except InputError:
        raise
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error) as e:
        raise InputError(f"not a readable .npz file ({e.__class__.__name__}); {_NPZ_FORMAT}", "format") from None
    if spec.channels == 1 and images.ndim == 3:
        images = images[:, None]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise InputError(f"labels[{bad[0]}] = {labels[bad[0]]} is out of range; labels are class indices "
                         f"0..{num_classes - 1}", "range")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _opaque_8bit(img):
    """An image whose pixels mean what they would mean to the model: 16-bit grey rescaled to 0..255 (Pillow's
    convert clips it, so any value from 255/65535 up turned white), and transparency composited on black.
    Black because a transparent pixel means "nothing there", which is 0 in the Fashion-MNIST and MNIST
    images the grey models learnt from (bright object, black background); it also equals the pixel's
    premultiplied colour. Dropping alpha instead showed whatever colour the transparent pixels happen to
    store (often white), and white would frame the object in a brightness the model never saw."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        scaled = np.asarray(img, dtype=np.float64) * (255 / 65535)  # PNG's 16-bit maximum to 8-bit's
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img


def decode_image_file(data: bytes, spec: InputSpec) -> np.ndarray:
    """A PNG or JPEG file -> (1, C, H, W) uint8: converted to grey (or RGB) and resized to the model's input."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("the uploaded file is empty; send a PNG or JPEG image", "empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise InputError(f"the file is a {img.format} image; send PNG or JPEG", "format", 415)
            if img.width * img.height > 4096 * 4096:
                raise InputError(f"the image is {img.width}x{img.height}; the limit is 4096x4096 pixels",
                                 "too_big", 413)
            img = _opaque_8bit(img).convert("L" if spec.channels == 1 else "RGB").resize(
                (spec.width, spec.height), Image.Resampling.BILINEAR)
            arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"the uploaded file is not a readable PNG or JPEG image ({e.__class__.__name__})",
                         "not_an_image", 400) from None
    arr = arr[None, None] if spec.channels == 1 else arr.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(arr)


_POOL: ThreadPoolExecutor | None = None


def _cpu_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="imgclf-cpu")
    return _POOL


@dataclass
class Classifier:
    """A verified artifact version on a device, answering predict and evaluate."""

    loaded: LoadedModel
    device: torch.device
    backend: str = "torch"  # the BACKEND setting: torch, onnx or auto; resolved to torch or onnx here

    def __post_init__(self):
        m = self.loaded.manifest
        self.version, self.name, self.classes = m.version, m.name, list(m.classes)
        self.spec: InputSpec = m.input
        self.tta: bool = m.model.tta_flip
        # the manifest's calibration temperature (1.0 for versions published before it existed)
        self.temperature: float = m.metrics.calibration.temperature
        # service/backends.py: onnxruntime on the version's model.onnx (temperature folded in), or torch
        self.backend, self.backend_reason = backends.choose(self.backend, m, self.device, backends.ort_providers())
        self._onnx = (backends.OnnxRunner(self.loaded, self.device, settings.get().torch_threads)
                      if self.backend == "onnx" else None)

    @functools.cached_property
    def batcher(self) -> Batcher:
        """This model's adaptive batcher for /predict. It belongs to the model object, not to a version name: a
        reload (even back to a version served before) never takes it from a model that requests still use, and
        it goes away with the model. It holds the model by a weak proxy, so there is no reference cycle to keep
        a replaced model alive (the collector is frozen after loading)."""
        return Batcher(weakref.proxy(self))

    def warm_up(self) -> None:
        """One small pass before the first request (or before a reloaded version is swapped in)."""
        self.predict(np.zeros((2, *self.spec.shape), np.uint8))

    def probabilities(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        """uint8 (N, C, H, W) -> calibrated probabilities softmax(logits / T) (N, K) on the CPU.

        Passes of 256 images: LeNet on one thread ran at ~20,500 images/s against ~11,200 at 1,024
        (activations stay in cache). On the CPU a large request's passes run on one thread per core
        (torch releases the GIL inside its kernels; the model is read-only in eval mode), so an
        /evaluate uses every core while each pass keeps the one intra-op thread of TORCH_THREADS.
        """
        if self._onnx is not None and len(images) <= batch:  # one pass: torch around it cost more than the call
            return torch.from_numpy(self._onnx(images))
        x = torch.from_numpy(images)
        chunks = [x[i:i + batch] for i in range(0, len(x), batch)]
        if len(chunks) == 1 or self.device.type != "cpu":
            return torch.cat([self._pass(c) for c in chunks])
        return torch.cat(list(_cpu_pool().map(self._pass, chunks)))

    @torch.inference_mode()
    def _pass(self, xb: torch.Tensor) -> torch.Tensor:
        if self._onnx is not None:
            return torch.from_numpy(self._onnx(xb.numpy()))
        xb = preprocess(xb.to(self.device, non_blocking=True), self.spec)
        return probabilities(forward_logits(self.loaded.model, xb, self.tta), self.temperature).cpu()

    def predict(self, images: np.ndarray, top_k: int = DEFAULT_TOP_K) -> list[dict]:
        top_k = parse_top_k(top_k, len(self.classes))
        return self.answers(self.probabilities(images), top_k)

    def answers(self, probs: torch.Tensor, top_k: int) -> list[dict]:
        """Softmax probabilities (N, K) -> one answer per image: argmax and the top-k classes."""
        p, idx = probs.topk(top_k, dim=1)
        p, idx = p.tolist(), idx.tolist()
        return [{"label": ix[0], "class_name": self.classes[ix[0]], "probability": pr[0],
                 "top_k": [{"label": j, "class_name": self.classes[j], "probability": q} for j, q in zip(ix, pr)]}
                for pr, ix in zip(p, idx)]

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict:
        preds = self.probabilities(images).argmax(1)
        cm = metrics.confusion_matrix(torch.from_numpy(labels), preds, len(self.classes))
        return self.evaluation_answer(cm)

    def evaluation_answer(self, cm: torch.Tensor) -> dict:
        """Accuracy, counts, 95% interval and the consistency test against the offline test set."""
        s = metrics.summarize(cm, self.classes)
        n, correct = s["n"], int(cm.trace())
        offline = self.loaded.manifest.metrics
        off_n, off_correct = offline.n, offline.correct
        lo, hi = metrics.wilson_interval(correct, n)
        p_value = metrics.two_proportion_test(correct, n, off_correct, off_n)
        return {
            "model_version": self.version,
            **s,
            "accuracy_ci95": [lo, hi],
            "offline_test_accuracy": offline.test_accuracy,
            "offline_test_n": off_n,
            "consistent_with_offline": p_value >= 0.05,
            "consistency_test": {
                "test": "two-sided pooled two-proportion z-test, this batch vs the offline test set",
                "alpha": 0.05,
                "p_value": p_value,
            },
        }


class Batcher:
    """Adaptive batching for /predict: images of requests that arrive together, or while a forward
    pass runs, are stacked into one pass, up to `max_batch` images.

    There is no waiting window: an image that finds the model idle runs in the event loop's next
    step, so batching adds no latency at low load and never refuses a request (BentoML's own adaptive
    batching answers 503 when it cannot meet its latency target, and would change the answer's shape).
    On the CPU a pass of at most `inline_max` images runs on the event loop itself: handing it to a
    thread and back cost more than the pass (two thread wake-ups and the loop's self-pipe per request,
    README "Benchmarks"). Larger passes, and every pass on a GPU, run on one inference thread, leaving
    the event loop free to read the next requests meanwhile.
    """

    def __init__(self, classifier: Classifier, max_batch: int = 256, inline_max: int = INLINE_MAX_IMAGES):
        self.classifier, self.max_batch = classifier, max_batch
        self.inline_max = inline_max if classifier.device.type == "cpu" else 0
        self.pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.draining = False
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imgclf-infer")

    async def probabilities(self, images: np.ndarray) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((images, future))
        if not self.draining:
            self.draining = True
            # a task's first step runs after the steps already due: requests read together batch together
            loop.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        take, n = [], 0
        while self.pending and (not take or n + len(self.pending[0][0]) <= self.max_batch):
            item = self.pending.popleft()
            if item[1].done():  # cancelled: its client went away while it waited (service/limits.py)
                continue
            take.append(item)
            n += len(item[0])
        return take

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                take = self._take()
                if not take:
                    continue
                x = take[0][0] if len(take) == 1 else np.concatenate([images for images, _ in take])
                prom.child(prom.get().forward_batch_size, self.classifier.version).observe(len(x))
                try:
                    if len(x) <= self.inline_max:
                        probs = self.classifier.probabilities(x)
                    else:
                        probs = await loop.run_in_executor(self.executor, self.classifier.probabilities, x)
                except Exception as e:  # noqa: BLE001 - every waiting request hears of it
                    for _, future in take:
                        if not future.done():
                            future.set_exception(e)
                    continue
                start = 0
                for images, future in take:
                    if not future.done():  # a client that went away leaves a cancelled future
                        future.set_result(probs[start:start + len(images)])
                    start += len(images)
        finally:
            self.draining = False
