"""Model builders: a plain dict from name to constructor, shared by training and serving.

Every builder takes the input shape and class count, plus its own keyword arguments, so the
manifest's `model` block ({"arch", "kwargs"}) rebuilds the exact architecture.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether bfloat16 autocast speeds training up on this kind of device: a CUDA GPU with bf16, or a
    CPU with AVX512-BF16 or AMX instructions. Elsewhere oneDNN emulates bf16 and training is about ten
    times slower than float32 (66 against 730 images per CPU-second on the AVX2 test host,
    docs/training-results.md), so `train_bf16` models train in float32 there; the manifest records which
    (training.precision)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(model: nn.Module, device: torch.device) -> str:
    """What a training run of `model` on `device` computes in: the manifest's training.precision."""
    if not getattr(model, "train_bf16", False):
        return "float32"
    if native_bf16(device.type):
        return "bfloat16 autocast"
    return f"float32 (train_bf16 asked; this {device.type} has no native bfloat16)"


def _autocast(model: nn.Module, x: torch.Tensor) -> torch.autocast:
    return torch.autocast(x.device.type, dtype=torch.bfloat16,
                          enabled=model.train_bf16 and model.training and native_bf16(x.device.type))


def _nhwc(module: nn.Module, on: bool) -> bool:
    """Put the conv weights in channels_last when `on` (else oneDNN reorders them every call)."""
    if on:
        module.to(memory_format=torch.channels_last)
    return on


class LeNet(nn.Module):
    """LeNet-5 as in the seed tutorial; 28x28 inputs get padding 2 so the first conv sees 32x32.

    channels_last: as for CNN below, a layout switch that leaves the weights and what they compute
    unchanged (the lenet preset sets it: measured faster, see docs/training-results.md).
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, channels_last: bool = False):
        super().__init__()
        self.pad = 2 if min(height, width) < 32 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=self.pad)
        self.conv2 = nn.Conv2d(6, 16, 5)
        h = ((height + 2 * self.pad - 4) // 2 - 4) // 2
        w = ((width + 2 * self.pad - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.channels_last = _nhwc(self, channels_last)

    def forward(self, x):  # (B, C, H, W) -> (B, K)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 6, 14, 14) for 28x28
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    # bias is redundant before BatchNorm
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CNN(nn.Module):
    """A small VGG-style net with BatchNorm: blocks of conv-BN-ReLU, each block ending in 2x2 max-pool.

    Speed switches (measured on the 2-core CPU, see docs/training-results.md); neither changes what
    the weights mean, and evaluation / serving always run in float32:
      channels_last  feed the convolutions NHWC activations (oneDNN's fast layout on CPU)
      train_bf16     autocast to bfloat16 while training (model.train()) where the device computes bf16
                     natively (native_bf16); master weights stay float32
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 widths: tuple[int, ...] = (32, 64, 128), convs_per_block: int = 2, dropout: float = 0.1,
                 channels_last: bool = False, train_bf16: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in widths:
            for _ in range(convs_per_block):
                layers.append(_conv_bn(cin, cout))
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        self.channels_last, self.train_bf16 = _nhwc(self, channels_last), train_bf16

    def forward(self, x):  # (B, C, H, W) -> (B, K)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self, x):
            x = self.features(x)  # (B, widths[-1], H / 2^blocks, W / 2^blocks)
            x = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)  # (B, widths[-1])
            x = self.head(self.dropout(x))
        return x.float()  # the loss and the metrics see float32 logits


class ResNet(nn.Module):
    """A small ResNet for 28x28 (or 32x32) images, built from torchvision's own BasicBlock.

    stem: one 3x3 conv-BN-ReLU at full resolution (no 7x7 stride-2 conv and max-pool: they would
    shrink a 28x28 image to 7x7 before the first block); then `blocks_per_stage` BasicBlocks per
    width, the first block of every later stage with stride 2 and torchvision's 1x1 conv + BN
    shortcut; global average pooling; a linear head. The default (64, 128, 256) x 2 has 2,776,522
    parameters for 1-channel input and 10 classes.

    The same speed switches as CNN (channels_last, train_bf16: bfloat16 autocast only while
    training, float32 logits). Global pooling is a mean over H and W rather than
    adaptive_avg_pool2d, whose CUDA backward has no deterministic kernel (--deterministic raises).
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 widths: tuple[int, ...] = (64, 128, 256), blocks_per_stage: int = 2,
                 channels_last: bool = False, train_bf16: bool = False):
        # imported here: torchvision.models imports torch._dynamo, seconds of CPU that every server process and
        # every other model would pay at import for a block only this model uses
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                shortcut = None
                if stride != 1 or cin != cout:  # torchvision's projection shortcut
                    shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                blocks.append(BasicBlock(cin, cout, stride=stride, downsample=shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision ResNet's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.channels_last, self.train_bf16 = _nhwc(self, channels_last), train_bf16

    def forward(self, x):  # (B, C, H, W) -> (B, K)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self, x):
            x = self.blocks(self.stem(x))  # (B, widths[-1], H / 2^(stages-1), W / 2^(stages-1)): 7x7 for 28x28
            x = self.head(x.mean(dim=(2, 3)))  # (B, widths[-1]) -> (B, K)
        return x.float()  # the loss and the metrics see float32 logits


class GRUClassifier(nn.Module):
    """Reads the image row by row: a sequence of H steps, each a row of C*W pixels."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 hidden: int = 128, layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(in_channels * width, hidden, num_layers=layers, batch_first=True)
        self.norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):  # (B, C, H, W) -> (B, K)
        b, c, h, w = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, H, C*W)
        _, last = self.gru(seq)  # (layers, B, hidden)
        return self.head(self.norm(last[-1]))


class MLP(nn.Module):
    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 hidden: tuple[int, ...] = (256, 128), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_channels * height * width
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, C, H, W) -> (B, K)
        return self.net(x)


MODELS: dict[str, type[nn.Module]] = {"lenet": LeNet, "cnn": CNN, "resnet": ResNet, "gru": GRUClassifier,
                                      "mlp": MLP}


def build_model(arch: str, in_channels: int, height: int, width: int, num_classes: int, **kwargs) -> nn.Module:
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; known models: {', '.join(sorted(MODELS))}")
    builder = MODELS[arch]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("in_channels", "height", "width",
                                                                               "num_classes")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {arch!r} takes no argument(s) {', '.join(unknown)}; "
                         f"its arguments: {', '.join(accepted)}")
    # JSON turns tuples into lists; the builders take tuples
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return builder(in_channels, height, width, num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        if not kwargs:
            raise
        raise ValueError(f"model {arch!r} cannot be built with {kwargs}: {e}") from None


def forward_logits(model: nn.Module, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """Logits of a normalised batch; with tta_flip, the mean of the image's and its mirror's logits.

    Training's final evaluation and the service both call this, so the served model computes
    exactly what the manifest's accuracy measured.
    """
    logits = model(x)
    if tta_flip:
        logits = (logits + model(x.flip(-1))) / 2
    return logits


def normalise(x01: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, on the 0..1 scale: (N, C, H, W) with mean, std (1, C, 1, 1).

    The one normalisation of training batches (after augmentation), evaluation and serving, so the
    served model sees exactly the numbers it was trained on.
    """
    return (x01 - mean) / std


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over classes: (N, K) -> (N, K), the probabilities every caller reports.

    T is the manifest's calibration temperature (1.0: the plain softmax). Training's test
    evaluation and the service both call this, so the served probabilities are the ones whose
    calibration the manifest measured. T > 0 rescales only, so the argmax is the logits' argmax.
    """
    assert temperature > 0, temperature
    return (logits / temperature).softmax(1)


def preprocess(images: torch.Tensor, input_spec) -> torch.Tensor:
    """uint8-range pixels (N, C, H, W) -> the normalised float batch the model was trained on.

    `input_spec` is the manifest's core.manifest.InputSpec (mean, std, scale)."""
    mean = torch.tensor(input_spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(input_spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return normalise(images.float() / input_spec.scale, mean, std)


def pick_device(setting: str) -> torch.device:
    """'cpu', 'cuda' (fails clearly without a GPU) or 'auto' (a GPU when one is visible)."""
    if setting not in ("auto", "cpu", "cuda") and not setting.startswith("cuda:"):
        raise ValueError(f"unknown device {setting!r}; use auto, cpu, cuda or cuda:N")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} asked for, but torch sees no CUDA GPU; use DEVICE=cpu or auto")
    return torch.device(setting)
