"""`model.onnx`: the served computation of a version as one ONNX graph, for runtimes other than PyTorch.

    input   pixels         uint8 (N, C, H, W), raw pixel values 0..255; N is dynamic
    output  probabilities  float32 (N, K), softmax(logits / temperature): what the service answers

Folded into the graph, so a caller sends raw pixels and gets what /predict would: the scaling to
0..1 and the per-channel normalisation of the manifest's input spec (core.models.preprocess), the
flip averaging where the manifest says tta_flip (core.models.forward_logits), and a temperature
(1.0 unless calibration sets one). The model's metadata_props carry the classes, the input spec and
the version, so the file describes itself.

Exporter: torch.onnx.export's TorchScript path (dynamo=False). Measured on the shared 2-core machine
(2026-11-30, one export in a fresh process, CPU seconds of the process): lenet 0.3 s and the default
cnn 0.7 s (0.8 s and 1.9 s wall under a load average of 9), under 1% of their `make train`; the dynamo
exporter took 7.2 s and 10.6 s CPU (18.5 s and 26.7 s wall), needs onnxscript, rebuilds its operator
registry on every call and stamps per-node stack traces that differ from run to run. The TorchScript
path is deprecated since torch 2.9 and warns so; the warning is silenced here only. When a torch
release drops it, pass dynamo=True with dynamic_shapes instead of dynamic_axes and install
onnxscript: tests/test_export.py checks the result either way. Nothing is pickled: the graph is
traced and written as protobuf.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from core.manifest import InputSpec, Manifest
from core.models import build_model, forward_logits, preprocess

ONNX = "model.onnx"
OPSET = 18  # onnxruntime 1.16+ and most other runtimes read it
EXAMPLE_BATCH = 2  # traced batch; the tests run other sizes, so a frozen batch axis fails them


class ServedModel(nn.Module):
    """uint8 pixels (N, C, H, W) -> probabilities (N, K), exactly as service.inference.Classifier computes them."""

    def __init__(self, model: nn.Module, input_spec: InputSpec, tta_flip: bool, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.model, self.input_spec, self.tta_flip, self.temperature = model, input_spec, tta_flip, float(temperature)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) uint8 -> (N, K)
        logits = forward_logits(self.model, preprocess(pixels, self.input_spec), self.tta_flip)
        return (logits / self.temperature).softmax(1)


def export_onnx(state_dict: dict[str, torch.Tensor], manifest: Manifest, temperature: float = 1.0) -> bytes:
    """The ONNX model (bytes) of the weights `state_dict` as the manifest describes them.

    The architecture is rebuilt from the manifest on the CPU, as core.artifacts.load rebuilds it, so the
    graph is that of the published version whatever device or wrapper trained it.
    """
    spec, inp = manifest.model, manifest.input
    model = build_model(spec.arch, inp.channels, inp.height, inp.width, manifest.num_classes, **spec.kwargs)
    model.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=True)
    served = ServedModel(model, inp, spec.tta_flip, temperature).eval()
    example = torch.zeros((EXAMPLE_BATCH, *inp.shape), dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        # the tracer's warnings name Python values it freezes (mean and std, nn.GRU's shape checks);
        # tests/test_export.py runs every architecture at another batch size than the traced one
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # said of every GRU with a dynamic batch axis; ours starts from zeros (no h0 input): any N works
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(served, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["probabilities"],
                          dynamic_axes={"pixels": {0: "N"}, "probabilities": {0: "N"}})
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = (f"{manifest.name} {manifest.version}: {spec.arch} on {manifest.dataset.name}. Input 'pixels' "
                        f"uint8 (N, {inp.channels}, {inp.height}, {inp.width}), raw values 0..{inp.scale:g}; output "
                        f"'probabilities' float32 (N, {manifest.num_classes}), softmax(logits / {temperature:g}); "
                        f"normalisation{' and flip averaging' if spec.tta_flip else ''} included.")
    proto.graph.input[0].doc_string = f"uint8 pixels (N, {inp.channels}, {inp.height}, {inp.width}), 0..{inp.scale:g}"
    proto.graph.output[0].doc_string = f"float32 softmax probabilities (N, {manifest.num_classes}), classes in order"
    meta = {"name": manifest.name, "version": manifest.version, "weights_sha256": manifest.weights_sha256,
            "classes": json.dumps(list(manifest.classes)),
            "input": json.dumps({"shape": list(inp.shape), "dtype": "uint8", "scale": inp.scale,
                                 "mean": list(inp.mean), "std": list(inp.std)}),
            "tta_flip": json.dumps(spec.tta_flip), "temperature": repr(float(temperature))}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=f"imgclf.{k}", value=v)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def with_onnx(manifest: Manifest, write_extras, state_dict: dict[str, torch.Tensor], temperature: float = 1.0):
    """The manifest naming model.onnx, and a write_extras for core.artifacts.publish that also writes it
    (inside the version's temporary folder, so publish hashes it like every file)."""
    def write(folder: Path, m: Manifest) -> None:
        if write_extras is not None:
            write_extras(folder, m)
        (folder / ONNX).write_bytes(export_onnx(state_dict, m, temperature))
    return manifest.replace(onnx=ONNX), write
