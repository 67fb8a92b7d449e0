"""core/models.py: every model by name, for grey 28x28 and colour 32x32 inputs."""

from __future__ import annotations

import pytest
import torch

from core.manifest import InputSpec
from core.models import MODELS, build_model, forward_logits, pick_device, preprocess

NAMES = ["lenet", "cnn", "resnet", "gru", "mlp"]


def test_the_registry_holds_the_four_models_of_the_issue_and_resnet():
    assert sorted(MODELS) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_output_is_one_logit_per_class(name, shape):
    torch.manual_seed(0)
    c, h, w = shape
    model = build_model(name, c, h, w, 10)
    x = torch.randn(4, c, h, w)
    model.train()
    out = model(x)
    assert out.shape == (4, 10) and out.dtype == torch.float32
    out.sum().backward()  # every parameter takes part in the forward pass
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)  # a single image in eval mode (BatchNorm uses running stats)
        assert forward_logits(model, x, tta_flip=True).shape == (4, 10)


@pytest.mark.parametrize("name", NAMES)
def test_other_class_counts(name):
    model = build_model(name, 1, 28, 28, 3).eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_manifest_kwargs_rebuild_the_same_architecture():
    # JSON turns tuples into lists: the builder accepts them as written in the manifest
    a = build_model("mlp", 1, 28, 28, 10, hidden=[32, 16])
    assert [tuple(p.shape) for p in a.parameters()] == [(32, 784), (32,), (16, 32), (16,), (10, 16), (10,)]
    b = build_model("gru", 1, 28, 28, 10, hidden=24)
    assert b.gru.hidden_size == 24 and b.gru.input_size == 28


@pytest.mark.parametrize("name", ["lenet", "cnn", "resnet"])
def test_channels_last_is_a_layout_only(name):
    # the presets switch it on: the same seed must give the same weights, the same saved tensors
    # and the same logits (up to float rounding of a different kernel) as the plain layout
    torch.manual_seed(0)
    plain = build_model(name, 1, 28, 28, 10).eval()
    torch.manual_seed(0)
    nhwc = build_model(name, 1, 28, 28, 10, channels_last=True).eval()
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for (k, a), (k2, b) in zip(plain.state_dict().items(), nhwc.state_dict().items()):
        assert k == k2 and torch.equal(a, b.contiguous())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-4, atol=1e-5)
    nhwc.train()
    nhwc(x).sum().backward()  # trains in that layout too
    assert all(p.grad is not None for p in nhwc.parameters())


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*cnn, gru, lenet, mlp, resnet"):
        build_model("vgg", 1, 28, 28, 10)


def test_the_service_imports_neither_torchvision_nor_dynamo():
    """Each server process imports the service (BentoML's arbiter, then every worker): torchvision.models pulls in
    torch._dynamo, about 4 s of CPU per process, for a block only the resnet uses; it is imported when one is built."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, service.service; "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_resnet_is_built_from_torchvisions_basic_block():
    # the issue asks for torchvision's own block, not a copy: 3 stages x 2 blocks, widths 64/128/256,
    # downsampling (stride 2, 1x1 conv shortcut) at the first block of the 2nd and 3rd stage
    from torchvision.models.resnet import BasicBlock

    model = build_model("resnet", 1, 28, 28, 10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6 and all(type(b) is BasicBlock for b in blocks)
    assert [b.conv2.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256]
    assert [b.stride for b in blocks] == [1, 1, 2, 1, 2, 1]
    assert [b.downsample is not None for b in blocks] == [False, False, True, False, True, False]
    assert model.stem[0].in_channels == 1 and model.head.in_features == 256
    assert sum(p.numel() for p in model.parameters()) == 2_776_522
    x = torch.randn(2, 1, 28, 28)
    assert model.blocks(model.stem(x)).shape == (2, 256, 7, 7)  # 28 -> 14 -> 7


@pytest.mark.parametrize("native", [True, False])
def test_resnet_bf16_autocast_only_while_training_where_native_and_logits_stay_float32(monkeypatch, native):
    from core import models

    monkeypatch.setattr(models, "native_bf16", lambda device_type: native)
    torch.manual_seed(0)
    model = build_model("resnet", 1, 28, 28, 10, widths=[8, 16], train_bf16=True)
    x = torch.randn(3, 1, 28, 28)
    seen = []
    hook = model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.train()
    assert model(x).dtype == torch.float32
    model.eval()
    with torch.no_grad():
        assert model(x).dtype == torch.float32
    hook.remove()
    # autocast in training only, and only where bf16 is native; evaluation is float32
    assert seen == [torch.bfloat16 if native else torch.float32, torch.float32]
    cpu = torch.device("cpu")
    assert models.training_precision(model, cpu) == ("bfloat16 autocast" if native else
                                                     "float32 (train_bf16 asked; this cpu has no native bfloat16)")
    assert models.training_precision(build_model("lenet", 1, 28, 28, 10), cpu) == "float32"


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    from core import models

    def flags(text):
        models.native_bf16.cache_clear()
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {text}\n")
        return models.native_bf16("cpu")

    real = models.Path
    monkeypatch.setattr(models, "Path", lambda p: tmp_path / "cpuinfo" if p == "/proc/cpuinfo" else real(p))
    try:
        assert flags("fpu sse avx2 avx512f") is False  # AVX-512 without BF16: emulated
        assert flags("fpu avx2 avx512f avx512_bf16") is True
        assert flags("fpu avx2 amx_bf16 amx_tile") is True
        assert models.native_bf16("mps") is False
    finally:
        models.native_bf16.cache_clear()


def test_tta_flip_averages_the_mirrored_logits():
    torch.manual_seed(0)
    model = build_model("mlp", 1, 4, 4, 3).eval()
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
        assert torch.allclose(forward_logits(model, x, tta_flip=True), expected)
        assert torch.equal(forward_logits(model, x), model(x))


def test_preprocess_scales_and_normalises_like_training():
    spec = InputSpec(channels=1, height=1, width=2, mean=(0.5,), std=(0.25,), scale=255.0)
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    assert preprocess(x, spec).flatten().tolist() == [-2.0, 2.0]


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            pick_device("cuda")
