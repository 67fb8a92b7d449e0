"""What computes a version's probabilities: torch (the module core.artifacts built) or onnxruntime on the
version's model.onnx (training/export.py: the same computation, normalisation, flip averaging and the
calibration temperature folded in; uint8 (N, C, H, W) in, float32 (N, K) out).

BACKEND (service/settings.py) chooses. `auto`, the default, takes onnxruntime on the CPU whenever the
version carries a model.onnx: bench/onnx_backend.py measured it 9.6x faster than torch for a single
LeNet image, 7.1x for the default cnn, and 2.2x / 2.6x for a pass of 256 images (one thread each,
bench/results/onnx_backend.json). On a GPU `auto` keeps torch: nothing here measured onnxruntime there.
An explicit BACKEND=onnx that cannot be honoured is refused with the reason (the service then stays
unready and says why on /readyz), never served by the other backend behind the operator's back.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from core.artifacts import IntegrityError, LoadedModel
from core.manifest import Manifest


class BackendError(ValueError):
    """A BACKEND this version or this machine cannot serve; the message says why and what to do."""


def ort_providers() -> list[str] | None:
    """onnxruntime's execution providers on this machine, or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.get_available_providers()


def choose(setting: str, manifest: Manifest, device: torch.device, providers: list[str] | None) -> tuple[str, str]:
    """(backend, why) for BACKEND=`setting`; BackendError when an explicit `onnx` cannot be served."""
    version = f"{manifest.name}/{manifest.version}"
    if setting == "torch":
        return "torch", "BACKEND=torch"
    if setting == "auto":
        if device.type != "cpu":
            return "torch", f"BACKEND=auto on {device}: torch on a GPU"
        if manifest.onnx is None:
            return "torch", f"BACKEND=auto: {version} has no model.onnx (published before it existed)"
        if providers is None:
            return "torch", "BACKEND=auto: onnxruntime is not installed"
        return "onnx", "BACKEND=auto on the CPU: onnxruntime on model.onnx"
    assert setting == "onnx", setting
    if manifest.onnx is None:
        raise BackendError(f"BACKEND=onnx, but {version} has no model.onnx (it was published before versions "
                           "carried one): serve it with BACKEND=torch or BACKEND=auto, or train a new version")
    if providers is None:
        raise BackendError("BACKEND=onnx needs onnxruntime, which is not installed: install requirements.txt "
                           "(onnxruntime), or serve with BACKEND=torch")
    if device.type == "cuda" and "CUDAExecutionProvider" not in providers:
        raise BackendError(f"BACKEND=onnx on {device} needs onnxruntime-gpu (this onnxruntime offers "
                           f"{', '.join(providers)}): use BACKEND=torch or BACKEND=auto on a GPU, or DEVICE=cpu")
    return "onnx", "BACKEND=onnx"


class OnnxRunner:
    """An onnxruntime session of a loaded version's model.onnx: uint8 (N, C, H, W) -> float32 probabilities (N, K).

    The bytes handed to onnxruntime are the ones whose sha256 is checked here against the manifest, so the
    graph that runs is the hashed one even if the file changed after core.artifacts.load verified it.
    Sessions are safe to run from several threads at once (service.inference runs an /evaluate's passes so).
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, threads: int):
        import onnxruntime as ort

        m = loaded.manifest
        path = loaded.folder / m.onnx
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != m.files.get(m.onnx):
            raise IntegrityError(f"{path}: sha256 does not match the manifest's; refused")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1  # as torch: TORCH_THREADS per worker
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: its warnings would land in the service's log per session
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(data, opts, providers=providers)
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        self.input, self.output = inp.name, out.name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input: np.ascontiguousarray(images)})[0]
