"""Exact replay: `python -m training train --from-version NAME/VERSION` reruns a version's recorded run.

The version is verified, its recorded config (the manifest's `config`) is rebuilt as a TrainConfig,
and the data it would read is hashed and compared with the manifest's `dataset.files` before any
training: a file whose bytes differ, one that is missing, or one the version never read is refused
by name. The run then trains and publishes a new version whose manifest says `replay_of`. On the
CPU, with the same library versions, it has the same weights_sha256 as the original (training is
seeded and deterministic there; GPUs and other library versions need not be bit-exact).

Only where the run reads and writes may change: the artifacts folder (the source of the version
and the destination of the replay) and the data folder (to point at another copy of the same files).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from core import artifacts
from core.manifest import Manifest
from training.config import TrainConfig, check_names
from training.data import load_dataset

# settings a replay may change: where it reads and writes, never what it computes
REPLAY_OVERRIDES = ("artifacts_dir", "data_dir")


class ReplayError(ValueError):
    """A version that cannot be replayed exactly: the message names the version, setting or data file."""


def source(root: str | Path, ref: str) -> tuple[str, Manifest]:
    """'NAME/VERSION' -> (the same, its verified manifest)."""
    name, sep, version = ref.partition("/")
    if not sep or not name or not version:
        raise ReplayError(f"--from-version takes NAME/VERSION (as `python -m training list` shows), got {ref!r}")
    folder = artifacts.resolve(root, artifacts.check_name(name, "model name"), artifacts.check_name(version, "version"))
    return f"{name}/{version}", artifacts.verify(folder)


def recorded_config(manifest: Manifest, **overrides) -> TrainConfig:
    """The manifest's training config as a TrainConfig, with `overrides` (of REPLAY_OVERRIDES) applied."""
    recorded = dict(manifest.training.config)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise ReplayError(f"version {manifest.name}/{manifest.version} was trained with setting(s) "
                          f"{', '.join(unknown)} that this code does not have; "
                          "replay it with the release that wrote it")
    bad = sorted(set(overrides) - set(REPLAY_OVERRIDES))
    assert not bad, bad
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}  # JSON lists were tuples
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**{**values, "resume": False})
    check_names(cfg)
    return cfg


def check_data(manifest: Manifest, cfg: TrainConfig) -> None:
    """Hash the files `cfg` would train on and refuse, naming the file, any that differ from the record."""
    ref = f"{manifest.name}/{manifest.version}"
    recorded = manifest.dataset.files
    if not recorded:
        raise ReplayError(f"version {ref} records no sha256 of its data files (published before they were "
                          "recorded), so its data cannot be checked; it cannot be replayed exactly")
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    for fname in sorted(set(recorded) | set(ds.files)):
        where = Path(ds.source) / fname
        if fname not in ds.files:
            raise ReplayError(f"data file {fname}, which {ref} was trained on, was not read from {ds.source} "
                              f"(read: {', '.join(sorted(ds.files))}); refusing to replay")
        if fname not in recorded:
            raise ReplayError(f"data file {where} was not among the files {ref} was trained on "
                              f"({', '.join(sorted(recorded))}); refusing to replay")
        if ds.files[fname] != recorded[fname]:
            raise ReplayError(f"data file {where} differs from the one {ref} was trained on (sha256 "
                              f"{ds.files[fname][:16]}..., recorded {recorded[fname][:16]}...); refusing to replay")


def replay(ref: str, artifacts_dir: str = "artifacts", data_dir: str | None = None, log=print) -> tuple[Path, Manifest]:
    """Check, then rerun the version `ref` ('NAME/VERSION') under `artifacts_dir`; returns the new
    version's folder and the original's manifest."""
    from training.pipeline import train

    ref, original = source(artifacts_dir, ref)
    cfg = recorded_config(original, artifacts_dir=artifacts_dir, data_dir=data_dir)
    check_data(original, cfg)  # before any training
    log(f"replaying {ref}: its recorded config, data files identical to the recorded sha256")
    return train(cfg, log=log, replay_of=ref), original
