"""The manifest of an artifact version as frozen dataclasses: the one place that knows its keys.

`manifest.json` is a flat JSON object (the layout DESIGN.md documents); `Manifest.from_dict`
reads it into typed records and `to_dict` writes the same layout back, so a change of the
artifact format is a change to this file (and to the writer that fills it in training).

    Manifest
      model: ModelSpec          architecture and builder arguments (rebuilds the exact model)
      input: InputSpec          what one image is and how it is normalised
      dataset: DatasetRecord    which data and split sizes
      metrics: OfflineMetrics   test-set figures, all derived from one confusion matrix
        calibration: Calibration  the temperature the service divides logits by, and test-set ECE
      training: TrainingRecord  config, seed, libraries, history, fit verdict
      test_predictions          the file with the predicted class of every test image (None: an
                                older version; core.registry recomputes them on demand)
      onnx                      the file with the served computation as an ONNX graph (None: an older
                                version; training.export writes it)
      files                     every file of the version and its sha256

A manifest whose `schema_version` is not one this code reads is refused by name, as is one
with keys this version of the format does not have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
READABLE_SCHEMA_VERSIONS = (1,)


class ManifestError(ValueError):
    """A manifest that does not follow the format: the message names the key or version."""


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    kwargs: dict = field(default_factory=dict)  # builder keyword arguments (JSON: tuples become lists)
    tta_flip: bool = False                      # average with the mirrored image at test and serve time
    parameters: int = 0


@dataclass(frozen=True)
class InputSpec:
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]   # per channel, on the 0..1 scale
    std: tuple[float, ...]
    dtype: str = "uint8"
    layout: str = "CHW"
    scale: float = 255.0      # pixel value that maps to 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def describe(self) -> str:
        """'28x28' for grey images, '3x32x32' for colour ones: how messages name one image."""
        return f"{self.height}x{self.width}" if self.channels == 1 else f"{self.channels}x{self.height}x{self.width}"


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    source: str
    train: int
    val: int
    test: int
    test_is_full_official_set: bool
    # sha256 of every data file read, by file name inside `source`; a replay refuses other bytes.
    # Empty in manifests written before the hashes were recorded.
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling (Guo et al., 2017) and the test-set reliability of what is served.

    Served probabilities are softmax(logits / temperature) (core.models.probabilities); T > 0 only
    rescales the logits, so the argmax, and with it every accuracy figure, is the same as at T = 1.
    `ece`, `n_bins` and `bins` describe those served probabilities on the test set. Manifests written
    before temperature scaling have no temperature: they read as 1.0, the plain softmax they served.
    """
    ece: float                             # expected calibration error of the served probabilities, test set
    n_bins: int
    bins: list[dict]                       # equal-width confidence bins: lower, upper, count, confidence, accuracy
    temperature: float = 1.0               # fitted on the validation split, never on the test set
    ece_uncalibrated: float | None = None  # the same ECE at temperature 1.0
    fitted_on: str = ""                    # how the temperature was chosen, or why it is 1.0


@dataclass(frozen=True)
class OfflineMetrics:
    """Test-set figures; accuracy, `n` and `correct` all come from the confusion matrix."""
    test_accuracy: float
    test_loss: float
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted, raw counts
    per_class: list[dict]
    calibration: Calibration

    @property
    def n(self) -> int:
        return int(sum(map(sum, self.confusion_matrix)))

    @property
    def correct(self) -> int:
        return int(sum(row[i] for i, row in enumerate(self.confusion_matrix)))


@dataclass(frozen=True)
class TrainingRecord:
    config: dict
    seed: int
    libraries: dict
    git_commit: str | None
    device: str
    training_seconds: float
    stopped_early: bool
    best_epoch: int
    history: list[dict]
    verdict: dict
    distributed: dict | None = None  # world size, backend, images per rank (training.distributed)
    replay_of: str | None = None     # "NAME/VERSION" whose recorded config this run replayed (training.replay)
    precision: str | None = None     # what training computed in (core.models.training_precision); None: not recorded


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created_at: str
    model: ModelSpec
    classes: tuple[str, ...]
    input: InputSpec
    dataset: DatasetRecord
    metrics: OfflineMetrics
    training: TrainingRecord
    weights_sha256: str = ""           # filled in by core.artifacts.publish
    files: dict[str, str] = field(default_factory=dict)
    # name of a file listed in `files`: safetensors with int64 `predictions` and `labels`, one per
    # evaluated test image in the order of the official test set (core.registry reads and writes it)
    test_predictions: str | None = None
    # name of a file listed in `files`: the ONNX graph of what the service computes, uint8 pixels
    # (N, C, H, W) -> probabilities (N, K) (training.export documents it)
    onnx: str | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The flat JSON layout of manifest.json (the metrics and training records sit at top level)."""
        d = {
            "created_at": self.created_at,
            "model": dataclasses.asdict(self.model),
            "classes": list(self.classes),
            "input": {**dataclasses.asdict(self.input), "mean": list(self.input.mean), "std": list(self.input.std)},
            "dataset": dataclasses.asdict(self.dataset),
        }
        training = dataclasses.asdict(self.training)
        for optional in ("distributed", "replay_of", "precision"):  # absent unless set, as in older manifests
            if training[optional] is None:
                del training[optional]
        d.update(training)
        d.update(dataclasses.asdict(self.metrics))
        d.update(schema_version=self.schema_version, name=self.name, version=self.version,
                 weights_sha256=self.weights_sha256, files=dict(self.files))
        if self.test_predictions is not None:  # absent in versions published before it existed
            d["test_predictions"] = self.test_predictions
        if self.onnx is not None:  # absent in versions published before model.onnx existed
            d["onnx"] = self.onnx
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"a manifest is a JSON object, not {type(d).__name__}")
        schema = d.get("schema_version")
        if schema not in READABLE_SCHEMA_VERSIONS:
            raise ManifestError(f"manifest schema_version {schema!r} is not one this code reads "
                                f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); use the release that wrote it")
        top = {"created_at", "model", "classes", "input", "dataset", "schema_version", "name", "version",
               "weights_sha256", "files", "test_predictions", "onnx"}
        tr_keys = {f.name for f in dataclasses.fields(TrainingRecord)}
        me_keys = {f.name for f in dataclasses.fields(OfflineMetrics)}
        unknown = sorted(set(d) - top - tr_keys - me_keys)
        if unknown:
            raise ManifestError(f"manifest has unknown key(s) {', '.join(unknown)} for schema_version {schema}")
        try:
            inp = d["input"]
            return cls(
                name=d["name"], version=d["version"], created_at=d["created_at"],
                model=_record(ModelSpec, d["model"], "model"),
                classes=tuple(d["classes"]),
                input=_record(InputSpec, {**inp, "mean": tuple(inp["mean"]), "std": tuple(inp["std"])}, "input"),
                dataset=_record(DatasetRecord, d["dataset"], "dataset"),
                metrics=_record(OfflineMetrics, {**{k: d[k] for k in me_keys},
                                                 "calibration": _record(Calibration, d["calibration"], "calibration")},
                                "metrics"),
                training=_record(TrainingRecord, {k: d[k] for k in tr_keys if k in d}, "training record"),
                weights_sha256=d["weights_sha256"], files=dict(d["files"]), schema_version=schema,
                test_predictions=_optional_str(d.get("test_predictions"), "test_predictions"),
                onnx=_optional_str(d.get("onnx"), "onnx"),
            )
        except ManifestError:
            raise
        except KeyError as e:
            raise ManifestError(f"manifest lacks the key {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"manifest has a malformed block: {e}") from None


def _optional_str(value: Any, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ManifestError(f"manifest key {key!r} must be a file name or null, not {type(value).__name__}")
    return value


def _record(cls, d: Any, what: str):
    """cls(**d), naming the block and the keys when they do not fit."""
    if not isinstance(d, dict):
        raise ManifestError(f"manifest block {what!r} must be an object, not {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ManifestError(f"manifest block {what!r} has unknown key(s) {', '.join(unknown)}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ManifestError(f"manifest block {what!r} lacks {', '.join(missing)}")
    return cls(**d)
