"""One frozen dataclass holds every training setting; the CLI is generated from it.

Model presets change only the defaults for their model; a flag the user gives always wins.
The resolved config is stored in every artifact's manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train
    model: str = "cnn"                 # lenet | cnn | resnet | gru | mlp
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments, e.g. {"widths": [32, 64]}
    dataset: str = "fashion_mnist"     # fashion_mnist | mnist | cifar10
    data_dir: str | None = None        # folder with the dataset files; default: packaged / ./data
    name: str | None = None            # artifact name; default: the model name
    artifacts_dir: str = "artifacts"
    # --- data
    val_fraction: float = 0.1          # seeded split carved from the training set
    limit_train: int | None = None     # use only the first N training images (tests, dry runs)
    limit_test: int | None = None      # evaluate on the first N test images (tests only; manifest says so)
    augment: bool = True               # random horizontal flip and +-2 pixel shifts, on tensors
    random_erase: float = 0.0          # with augment: probability per training image of one noise-filled box
    tta_flip: bool = False             # average logits with the mirrored image at test and serve time
    # --- optimisation
    epochs: int = 15
    batch_size: int = 256
    optimizer: str = "sgd"             # sgd | nesterov | adam | adamw | rmsprop
    lr: float = 0.1                    # peak learning rate for onecycle
    momentum: float = 0.9              # sgd / nesterov / rmsprop
    weight_decay: float = 5e-4
    schedule: str = "onecycle"         # none | step | cosine | onecycle
    step_size: int = 5                 # epochs between decays for the step schedule
    gamma: float = 0.1                 # decay factor for the step schedule
    # --- loss
    loss: str = "cross_entropy"        # cross_entropy | weighted_cross_entropy | nll | focal | mse
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None  # weighted_cross_entropy; default: inverse frequency
    focal_gamma: float = 2.0
    focal_alpha: tuple[float, ...] | None = None
    # --- monitoring
    patience: int = 0                  # early stopping after N epochs without val-loss improvement; 0 = off
    underfit_accuracy: float = 0.80    # train and val accuracy both below this: underfitting
    overfit_gap: float = 0.03          # train accuracy above val accuracy by more than this: overfitting
    # --- run
    seed: int = 0
    device: str = "cpu"                # cpu | cuda | auto
    threads: int | None = None         # torch intra-op threads; default: torch's choice
    deterministic: bool = False        # torch.use_deterministic_algorithms (+ CUBLAS_WORKSPACE_CONFIG on CUDA)
    checkpoint: bool = True            # keep a resumable checkpoint after every epoch
    resume: bool = False               # continue the checkpoint of this exact config

    def resolved_name(self) -> str:
        return self.name or self.model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_id(self) -> str:
        """Stable id of what the run computes: everything except where outputs go and resume."""
        d = self.to_dict()
        for k in ("artifacts_dir", "resume", "checkpoint", "data_dir", "threads"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# Defaults per model, chosen on these 2-core machines (measurements: docs/training-results.md).
# cnn: a narrow (16, 32, 64) net in channels_last with bfloat16 autocast while training where bf16 is
# native (core.models.native_bf16; float32 elsewhere, ten times faster there than emulated bf16) (on an AMX
# CPU 2.4x the images/s of the same net in float32 NCHW, 6x those of a float32 (32, 64, 128) net),
# label smoothing, and test-time flip averaging, which the service repeats (it is in the manifest).
# Flip averaging only where training saw flips: lenet trains without augmentation, and averaging cost
# it 4 points of accuracy. lenet runs in channels_last (the whole preset run about 16% faster);
# torch.compile was slower for lenet.
PRESETS: dict[str, dict] = {
    "cnn": {"model_kwargs": {"widths": [16, 32, 64], "channels_last": True, "train_bf16": True},
            "label_smoothing": 0.1, "tta_flip": True},
    "lenet": {"model_kwargs": {"channels_last": True}, "epochs": 8, "batch_size": 128, "optimizer": "adam",
              "lr": 3e-3, "weight_decay": 0.0, "augment": False, "label_smoothing": 0.1},
    # resnet: a GPU preset, aimed at one H200: >= 0.950 mean test accuracy of 3 seeds with <= 60 s of
    # training each. NOT YET MEASURED ON A GPU: bench/gpu_train.py is the run that will say
    # (docs/training-results.md, "GPU"). Basis: a probe on one H200 (not this code; data and per-sample
    # crop/flip/random erasing on the GPU, bf16, channels_last, one-cycle SGD, label smoothing, flip TTA,
    # no compile) reached 0.9430 after 8 epochs in 22 s and 0.9533 after 20 in 48 s; 18 epochs at batch
    # 512 keeps that recipe under 60 s. device auto: the GPU when one is visible (on the 2-core CPU one
    # epoch takes minutes).
    "resnet": {"model_kwargs": {"channels_last": True, "train_bf16": True}, "epochs": 18, "batch_size": 512,
               "optimizer": "nesterov", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "onecycle",
               "label_smoothing": 0.1, "random_erase": 0.5, "tta_flip": True, "device": "auto"},
    "gru": {"epochs": 8, "batch_size": 128, "optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0,
            "augment": False},
    "mlp": {"epochs": 10, "batch_size": 256, "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0,
            "augment": False},
}


SMOOTHABLE = ("cross_entropy", "weighted_cross_entropy")  # the losses that take label_smoothing


def make_config(**overrides) -> TrainConfig:
    """Defaults, then the model's preset, then the caller's overrides (None means 'not given')."""
    given = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    model = given.get("model", TrainConfig.model)
    merged = {**PRESETS.get(model, {}), **given}
    if "label_smoothing" not in given and merged.get("loss", TrainConfig.loss) not in SMOOTHABLE:
        merged.pop("label_smoothing", None)  # a preset's smoothing is for cross-entropy; other losses take none
    cfg = TrainConfig(**merged)
    check_names(cfg)
    check_values(cfg)
    if not 0 <= cfg.random_erase <= 1:
        raise ValueError(f"random_erase is a probability in [0, 1], got {cfg.random_erase}")
    return cfg


def check_names(cfg: TrainConfig) -> None:
    """Refuse unknown registry names before any data is loaded, listing the known ones."""
    from core.models import MODELS
    from training.data import DATASETS
    from training.losses import LOSSES
    from training.optim import OPTIMIZERS, SCHEDULES

    # models and datasets are listed alphabetically, the others in their table's order (as their builders do)
    for what, value, known in (("model", cfg.model, sorted(MODELS)), ("dataset", cfg.dataset, sorted(DATASETS)),
                               ("loss", cfg.loss, list(LOSSES)), ("optimizer", cfg.optimizer, list(OPTIMIZERS)),
                               ("schedule", cfg.schedule, list(SCHEDULES))):
        if value not in known:
            plural = {"loss": "losses"}.get(what, what + "s")
            raise ValueError(f"unknown {what} {value!r}; known {plural}: {', '.join(known)}")


# Settings that must be a count, refused by name before any data is loaded (0 epochs or a batch of 0
# images would otherwise fail deep inside the loop, or train on nothing).
AT_LEAST_ONE = ("epochs", "batch_size", "limit_train", "limit_test", "threads", "step_size")


def check_values(cfg: TrainConfig) -> None:
    for name in AT_LEAST_ONE:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if cfg.patience < 0:
        raise ValueError(f"patience must be 0 (off) or more epochs, got {cfg.patience}")
    if not isinstance(cfg.model_kwargs, dict):
        raise ValueError(f"model_kwargs must be a JSON object such as {{\"widths\": [16, 32]}}, "
                         f"got {'an array' if isinstance(cfg.model_kwargs, (list, tuple)) else repr(cfg.model_kwargs)}")
