"""training/export.py: every version's model.onnx computes what the service serves.

onnxruntime's probabilities are compared with the service's PyTorch path (core.models.preprocess,
forward_logits with the manifest's tta_flip, softmax: what service.inference.Classifier computes) on
the 10,000 official test images, for the session's LeNet and a tiny cnn with flip averaging.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core import artifacts
from core.artifacts import IntegrityError
from core.models import MODELS, build_model, forward_logits, preprocess
from tests.conftest import tiny_config, tiny_manifest
from training.export import ONNX, ServedModel, export_onnx
from training.pipeline import train

TOLERANCE = 1e-4


def torch_probabilities(loaded, images: np.ndarray) -> np.ndarray:
    """What the service serves for these images: service.inference.Classifier's probabilities
    (preprocessing, flip averaging, the calibration temperature, softmax)."""
    from service.inference import Classifier

    return Classifier(loaded, torch.device("cpu")).probabilities(images).numpy()


def session(model_bytes_or_path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 2
    src = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def onnx_probabilities(sess: ort.InferenceSession, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([sess.run(["probabilities"], {"pixels": images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def _check_against_torch(root, name, version, images: np.ndarray) -> None:
    loaded = artifacts.load(root, name, version)  # verifies every hash, model.onnx's included
    m = loaded.manifest
    assert m.onnx == ONNX and ONNX in m.files
    sess = session(loaded.folder / ONNX)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("pixels", "tensor(uint8)", list(m.input.shape))
    assert (out.name, out.type, out.shape[1:]) == ("probabilities", "tensor(float)", [m.num_classes])
    assert isinstance(inp.shape[0], str), "the batch axis must be dynamic"
    expected = torch_probabilities(loaded, images)
    got = onnx_probabilities(sess, images)
    assert got.shape == expected.shape == (len(images), m.num_classes)
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.abs(onnx_probabilities(sess, images[:1]) - expected[:1]).max() < TOLERANCE  # batch 1
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["imgclf.classes"]) == list(m.classes) and meta["imgclf.version"] == version
    assert json.loads(meta["imgclf.tta_flip"]) is m.model.tta_flip


def test_lenet_onnx_gives_the_served_probabilities_on_the_10k_test_images(lenet_version, fashion):
    root, name, version, _ = lenet_version
    _check_against_torch(root, name, version, fashion.test_x.numpy())


def test_cnn_with_flip_averaging_onnx_gives_the_served_probabilities(tmp_path, fashion):
    cfg = tiny_config(tmp_path, model="cnn", limit_train=512, limit_test=256)  # the preset: tta_flip, channels_last
    assert cfg.tta_flip
    folder = train(cfg, log=lambda *_: None)
    assert artifacts.read_manifest(folder).model.tta_flip
    _check_against_torch(cfg.artifacts_dir, "cnn", folder.name, fashion.test_x.numpy())


def _random_state(arch: str, manifest) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(0)
    inp = manifest.input
    model = build_model(arch, inp.channels, inp.height, inp.width, manifest.num_classes, **manifest.model.kwargs).eval()
    return model.state_dict(), model


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_architecture_exports_what_torch_computes(arch):
    """Each builder in core.models (a new preset's too) exports with the batch axis dynamic."""
    from core.manifest import InputSpec, ModelSpec

    manifest = tiny_manifest().replace(model=ModelSpec(arch, {}, tta_flip=True),
                                       input=InputSpec(1, 28, 28, (0.3,), (0.35,)))
    state, model = _random_state(arch, manifest)
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        expected = forward_logits(model, preprocess(images, manifest.input), True).softmax(1).numpy()
    got = onnx_probabilities(session(export_onnx(state, manifest)), images.numpy())
    assert np.abs(got - expected).max() < TOLERANCE


def test_a_temperature_is_folded_in_with_one_argument():
    manifest = tiny_manifest()  # a 3-class MLP on 1x4x4
    state, model = _random_state("mlp", manifest)
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    with torch.inference_mode():
        logits = model(preprocess(images, manifest.input))
    for t in (1.0, 2.5, 0.5):
        got = onnx_probabilities(session(export_onnx(state, manifest, temperature=t)), images.numpy())
        assert np.abs(got - (logits / t).softmax(1).numpy()).max() < TOLERANCE
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ServedModel(model, manifest.input, False, temperature=0.0)


def test_export_never_pickles(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("pickle used during the ONNX export")
    for attr in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, attr, refuse)
    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    manifest = tiny_manifest()
    state, _ = _random_state("mlp", manifest)
    assert export_onnx(state, manifest)[:2]  # protobuf bytes


def test_a_manifest_naming_an_unhashed_onnx_is_refused_and_older_versions_without_it_load(lenet_version, tmp_path):
    import shutil

    root, name, version, _ = lenet_version
    for case in ("unhashed", "older"):
        copy = tmp_path / case / name / version
        shutil.copytree(root / name / version, copy)
        raw = json.loads((copy / "manifest.json").read_text())
        del raw["files"][ONNX]
        if case == "older":  # published before model.onnx existed: no key, no file
            del raw["onnx"]
            (copy / ONNX).unlink()
        (copy / "manifest.json").write_text(json.dumps(raw))
        if case == "unhashed":
            with pytest.raises(IntegrityError, match="names onnx 'model.onnx' but lists no hash"):
                artifacts.verify(copy)
        else:
            assert artifacts.verify(copy).onnx is None
