"""Orchestration: data -> model -> fit -> final test evaluation -> a published artifact version.

The one place where training writes files (checkpoints while running, the version at the end).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import safetensors
import torch
import torchvision

from core import artifacts, registry
from core.manifest import DatasetRecord, InputSpec, Manifest, ModelSpec, OfflineMetrics, TrainingRecord
from core.metrics import per_class
from core.models import build_model, pick_device, training_precision
from training import calibrate, export, report
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.data import channel_stats, load_dataset, split
from training.engine import evaluate, fit
from training.losses import build_loss
from training.optim import build_optimizer, build_schedule
from training.run import Batches, FitState, Run
from training.verdict import fit_verdict


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare(cfg: TrainConfig, train_idx=None, val_idx=None) -> Run:
    """Everything a run needs, built from the config alone (also used by k-fold and torchrun)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if cfg.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs a fixed workspace
    torch.use_deterministic_algorithms(cfg.deterministic)  # set either way: the manifest's config says which
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    n_train = len(ds.train_y) if cfg.limit_train is None else min(cfg.limit_train, len(ds.train_y))
    if train_idx is None:
        train_idx, val_idx = split(n_train, cfg.val_fraction, cfg.seed)
    mean, std = channel_stats(ds.train_x[train_idx])
    c, h, w = ds.shape
    stats = (torch.tensor(mean, device=device).view(1, c, 1, 1), torch.tensor(std, device=device).view(1, c, 1, 1))
    train = Batches(ds.train_x[train_idx].to(device), ds.train_y[train_idx].to(device), *stats)
    val = Batches(ds.train_x[val_idx].to(device), ds.train_y[val_idx].to(device), *stats)
    n_test = len(ds.test_y) if cfg.limit_test is None else min(cfg.limit_test, len(ds.test_y))
    test = Batches(ds.test_x[:n_test].to(device), ds.test_y[:n_test].to(device), *stats)
    k = len(ds.classes)
    model = build_model(cfg.model, c, h, w, k, **cfg.model_kwargs).to(device)
    criterion = build_loss(cfg, train.y.cpu(), k).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_schedule(cfg, optimizer, -(-len(train) // cfg.batch_size))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # data order and augmentation, drawn on the device
    input_spec = InputSpec(channels=c, height=h, width=w, mean=tuple(mean), std=tuple(std))
    return Run(dataset=ds, device=device, train=train, val=val, test=test, model=model, criterion=criterion,
               optimizer=optimizer, scheduler=scheduler, generator=gen, input_spec=input_spec)


def train(cfg: TrainConfig, log=print, replay_of: str | None = None) -> Path:
    """Train by `cfg`, evaluate on the official test set, publish a version; returns its folder.

    replay_of: "NAME/VERSION" when training.replay reruns that version's config (recorded in the manifest)."""
    started = time.perf_counter()
    run = prepare(cfg)
    name = artifacts.check_name(cfg.resolved_name(), "model name")
    ckpt = Path(cfg.artifacts_dir) / ".checkpoints" / f"{name}-{cfg.run_id()}"
    state = None
    if cfg.resume and (ckpt / "checkpoint.json").is_file():
        state = load_checkpoint(ckpt, run)
        log(f"resuming {ckpt} after epoch {state.epoch}")
    elif cfg.resume:
        log(f"no checkpoint at {ckpt}: starting from the beginning")
    elif ckpt.exists():
        shutil.rmtree(ckpt)
    log(f"training {cfg.model} on {run.dataset.name} ({len(run.train)} train / {len(run.val)} val / "
        f"{len(run.test)} test) on {run.device}, {sum(p.numel() for p in run.model.parameters()):,} parameters")
    state = fit(run, cfg, ckpt if cfg.checkpoint else None, state, log=lambda r: log(json.dumps(r)))
    seconds = time.perf_counter() - started
    folder = evaluate_and_publish(cfg, run, state, seconds, replay_of=replay_of)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    return folder


def evaluate_and_publish(cfg: TrainConfig, run: Run, state: FitState, seconds: float,
                         distributed: dict | None = None, replay_of: str | None = None) -> Path:
    """The final test evaluation and the published version (train() and training.distributed share it).

    The calibration temperature is fitted on the validation split's logits before the test set's are
    looked at (training.calibrate); the test set only measures the result."""
    name = artifacts.check_name(cfg.resolved_name(), "model name")
    val_logits = evaluate(run.model, run.criterion, run.val, run.num_classes, tta_flip=cfg.tta_flip)["logits"]
    test = evaluate(run.model, run.criterion, run.test, run.num_classes, tta_flip=cfg.tta_flip)
    test["calibration"] = calibrate.calibration_block(val_logits, run.val.y.cpu(), test["logits"], run.test.y.cpu())
    manifest = _manifest(cfg, run, test, state, seconds, distributed, replay_of)
    manifest, write_extras = _with_test_predictions(manifest, test["probs"].argmax(1), run.test.y)
    # model.onnx: the served computation, calibration temperature included
    manifest, write_extras = export.with_onnx(manifest, write_extras, run.model.state_dict(),
                                              temperature=test["calibration"].temperature)
    return artifacts.publish(cfg.artifacts_dir, name, run.model.state_dict(), manifest, write_extras=write_extras)


def _manifest(cfg: TrainConfig, run: Run, test: dict, state: FitState, seconds: float,
              distributed: dict | None, replay_of: str | None) -> Manifest:
    """The manifest of a version, less what artifacts.publish adds (name, version, hashes, files).

    `test` is evaluate()'s result on run.test with its calibration block. The one place the
    manifest's fields are assembled.
    """
    ds, cm = run.dataset, test["confusion_matrix"]
    return Manifest(
        name="", version="", created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model=ModelSpec(cfg.model, cfg.model_kwargs, cfg.tta_flip, sum(p.numel() for p in run.model.parameters())),
        classes=tuple(ds.classes),
        input=run.input_spec,
        dataset=DatasetRecord(ds.name, ds.source, len(run.train), len(run.val), len(run.test),
                              test_is_full_official_set=len(run.test) == len(ds.test_y), files=dict(ds.files)),
        metrics=OfflineMetrics(test_accuracy=float(cm.trace()) / int(cm.sum()), test_loss=test["loss"],
                               confusion_matrix=cm.tolist(), per_class=per_class(cm, ds.classes),
                               calibration=test["calibration"]),
        training=TrainingRecord(
            config=cfg.to_dict(), seed=cfg.seed,
            libraries={"python": platform.python_version(), "torch": torch.__version__,
                       "torchvision": torchvision.__version__, "numpy": np.__version__,
                       "safetensors": safetensors.__version__},
            git_commit=_git_commit(), device=str(run.device), training_seconds=round(seconds, 2),
            stopped_early=state.stopped_early, best_epoch=state.best_epoch, history=state.history,
            verdict=fit_verdict(state.history, cfg.underfit_accuracy, cfg.overfit_gap), distributed=distributed,
            replay_of=replay_of, precision=training_precision(run.model, run.device)),
    )


def _with_test_predictions(manifest: Manifest, predictions: torch.Tensor, labels: torch.Tensor):
    """The manifest naming the per-image test predictions, and a write_extras that also writes them
    (the same argmax the confusion matrix counted; core.registry compares versions with them)."""
    def write_extras(folder: Path, m: Manifest) -> None:
        _write_extras(folder, m)
        registry.write_test_predictions(folder, predictions, labels)
    return manifest.replace(test_predictions=registry.TEST_PREDICTIONS), write_extras


def _write_extras(folder: Path, manifest: Manifest) -> None:
    report.write_all(folder, manifest)
    with open(folder / "history.jsonl", "w") as f:
        for rec in manifest.training.history:
            f.write(json.dumps(rec) + "\n")


def cross_validate(cfg: TrainConfig, folds: int, log=print) -> dict:
    """k-fold cross-validation on the training set: per-fold and mean +- sd validation accuracy."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    n = len(ds.train_y) if cfg.limit_train is None else min(cfg.limit_train, len(ds.train_y))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    chunks = perm.chunk(folds)
    results = []
    for i in range(folds):
        val_idx = chunks[i]
        train_idx = torch.cat([c for j, c in enumerate(chunks) if j != i])
        run = prepare(cfg, train_idx, val_idx)
        state = fit(run, cfg, log=lambda r: None)
        ev = evaluate(run.model, run.criterion, run.val, run.num_classes)
        results.append({"fold": i + 1, "train": len(run.train), "val": len(run.val), "val_accuracy": ev["accuracy"],
                        "val_loss": ev["loss"], "epochs": state.epoch})
        log(f"fold {i + 1}/{folds}: val accuracy {ev['accuracy']:.4f} ({len(run.val)} images)")
    accs = torch.tensor([r["val_accuracy"] for r in results], dtype=torch.float64)
    summary = {"folds": folds, "model": cfg.model, "dataset": cfg.dataset, "config": cfg.to_dict(),
               "per_fold": results, "mean_val_accuracy": float(accs.mean()), "sd_val_accuracy": float(accs.std()),
               "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out = Path(cfg.artifacts_dir) / "cv" / f"{cfg.resolved_name()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(f"| {r['fold']} | {r['train']} | {r['val']} | {r['val_accuracy']:.4f} | {r['val_loss']:.4f} |"
                     for r in results)
    (out / "report.md").write_text(
        f"# {folds}-fold cross-validation of {cfg.model} on {cfg.dataset}\n\n"
        f"validation accuracy **{summary['mean_val_accuracy']:.4f} ± {summary['sd_val_accuracy']:.4f}** (mean ± sd)\n\n"
        f"| fold | train | val | val accuracy | val loss |\n|---|---|---|---|---|\n{rows}\n")
    summary["report"] = str(out)
    return summary
