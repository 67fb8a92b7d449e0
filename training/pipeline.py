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

from core import artifacts
from core.metrics import calibration, per_class
from core.models import build_model, pick_device
from training import report
from training.config import TrainConfig
from training.data import channel_stats, load_dataset, split
from training.engine import Batches, FitState, evaluate, fit, fit_verdict, load_checkpoint
from training.losses import build_loss
from training.optim import build_optimizer, build_schedule


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare(cfg: TrainConfig, train_idx=None, val_idx=None):
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
    input_spec = {"channels": c, "height": h, "width": w, "dtype": "uint8", "layout": "CHW",
                  "scale": 255.0, "mean": mean, "std": std}
    return ds, device, train, val, test, model, criterion, optimizer, scheduler, gen, input_spec


def train(cfg: TrainConfig, log=print) -> Path:
    """Train by `cfg`, evaluate on the official test set, publish a version; returns its folder."""
    started = time.perf_counter()
    ds, device, train_b, val_b, test_b, model, criterion, optimizer, scheduler, gen, input_spec = prepare(cfg)
    name = artifacts.check_name(cfg.resolved_name(), "model name")
    ckpt = Path(cfg.artifacts_dir) / ".checkpoints" / f"{name}-{cfg.run_id()}"
    state = None
    if cfg.resume and (ckpt / "checkpoint.json").is_file():
        state = load_checkpoint(ckpt, model, optimizer, scheduler, gen, device)
        log(f"resuming {ckpt} after epoch {state.epoch}")
    elif cfg.resume:
        log(f"no checkpoint at {ckpt}: starting from the beginning")
    elif ckpt.exists():
        shutil.rmtree(ckpt)
    log(f"training {cfg.model} on {ds.name} ({len(train_b)} train / {len(val_b)} val / {len(test_b)} test) "
        f"on {device}, {sum(p.numel() for p in model.parameters()):,} parameters")
    state = fit(model, criterion, optimizer, scheduler, train_b, val_b if len(val_b) else None, cfg,
                len(ds.classes), gen, ckpt if cfg.checkpoint else None, state,
                log=lambda r: log(json.dumps(r)))
    seconds = time.perf_counter() - started
    folder = evaluate_and_publish(cfg, name, ds, device, model, criterion, train_b, val_b, test_b, input_spec,
                                  state, seconds)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    return folder


def evaluate_and_publish(cfg: TrainConfig, name: str, ds, device, model, criterion, train_b: Batches,
                         val_b: Batches, test_b: Batches, input_spec: dict, state: FitState, seconds: float,
                         extra: dict | None = None) -> Path:
    """The final test evaluation and the published version (train() and training.distributed share it)."""
    test = evaluate(model, criterion, test_b, len(ds.classes), tta_flip=cfg.tta_flip)
    cm = test["confusion_matrix"]
    manifest = {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"arch": cfg.model, "kwargs": cfg.model_kwargs, "tta_flip": cfg.tta_flip,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "classes": ds.classes,
        "input": input_spec,
        "dataset": {"name": ds.name, "source": ds.source, "train": len(train_b), "val": len(val_b),
                    "test": len(test_b), "test_is_full_official_set": len(test_b) == len(ds.test_y)},
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "libraries": {"python": platform.python_version(), "torch": torch.__version__,
                      "torchvision": torchvision.__version__, "numpy": np.__version__,
                      "safetensors": safetensors.__version__},
        "git_commit": _git_commit(),
        "device": str(device),
        "training_seconds": round(seconds, 2),
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "test_accuracy": float(cm.trace()) / int(cm.sum()),
        "test_loss": test["loss"],
        "confusion_matrix": cm.tolist(),
        "per_class": per_class(cm, ds.classes),
        "calibration": calibration(test["probs"], test_b.y.cpu()),
        "history": state.history,
        "verdict": fit_verdict(state.history, cfg.underfit_accuracy, cfg.overfit_gap),
        **(extra or {}),
    }
    return artifacts.publish(cfg.artifacts_dir, name, model.state_dict(), manifest,
                             write_extras=lambda d, m: _write_extras(d, m))


def _write_extras(folder: Path, manifest: dict) -> None:
    report.write_all(folder, manifest)
    with open(folder / "history.jsonl", "w") as f:
        for rec in manifest["history"]:
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
        _, _, tr, va, _, model, crit, opt, sched, gen, _ = prepare(cfg, train_idx, val_idx)
        state = fit(model, crit, opt, sched, tr, va, cfg, len(ds.classes), gen, log=lambda r: None)
        ev = evaluate(model, crit, va, len(ds.classes))
        results.append({"fold": i + 1, "train": len(tr), "val": len(va), "val_accuracy": ev["accuracy"],
                        "val_loss": ev["loss"], "epochs": state.epoch})
        log(f"fold {i + 1}/{folds}: val accuracy {ev['accuracy']:.4f} ({len(va)} images)")
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
