"""The loop: train_one_epoch() and evaluate() take tensors and return numbers; fit() runs epochs
with early stopping and resumable checkpoints. Nothing here writes artifacts.

Data lives in memory as uint8 (N, C, H, W); each batch is sliced, scaled to 0..1, augmented as a
whole, normalised, and fed to the model. That removes the per-sample Python work of the classic
DataLoader + ToTensor + Normalize recipe.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from core.metrics import confusion_matrix
from core.models import forward_logits
from training.data import augment


@dataclass
class Batches:
    """Images and labels kept as tensors on the training device, with the normalisation to apply."""
    x: torch.Tensor     # (N, C, H, W) uint8
    y: torch.Tensor     # (N,) int64
    mean: torch.Tensor  # (1, C, 1, 1) on the 0..1 scale
    std: torch.Tensor

    def normalise(self, xf: torch.Tensor) -> torch.Tensor:
        return (xf - self.mean) / self.std

    def __len__(self):
        return self.y.numel()


class Progress:
    """A live bar on a terminal (loss, accuracy, images/s, ETA); nothing between epochs otherwise."""

    def __init__(self, total_steps: int, prefix: str, stream=None):
        # sys.stderr looked up now, not at import: it may have been replaced since (pytest, notebooks)
        stream = sys.stderr if stream is None else stream
        self.total, self.prefix, self.stream = total_steps, prefix, stream
        self.live = stream.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def due(self, step: int) -> bool:
        """Whether update() would draw now: the loop asks before it reads the device's numbers (a host sync)."""
        return self.live and (time.perf_counter() - self.last_draw >= 0.1 or step >= self.total)

    def update(self, step: int, loss: float, acc: float, seen: int) -> None:
        now = time.perf_counter()
        if not self.live or (now - self.last_draw < 0.1 and step < self.total):
            return
        self.last_draw = now
        elapsed = now - self.start
        eta = elapsed / step * (self.total - step) if step else 0.0
        filled = int(24 * step / self.total)
        self.stream.write(f"\r{self.prefix} [{'#' * filled}{'.' * (24 - filled)}] {step}/{self.total} "
                          f"loss {loss:.4f} acc {acc:.4f} {seen / max(elapsed, 1e-9):,.0f} img/s ETA {eta:4.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


def train_one_epoch(model, criterion, optimizer, scheduler, data: Batches, batch_size: int,
                    gen: torch.Generator, do_augment: bool, progress: Progress | None = None,
                    erase: float = 0.0) -> dict:
    """One pass over `data` in a seeded random order. Returns mean loss, accuracy and images/s.

    `gen` draws on its own device (a CUDA generator: no per-step host-device traffic, see augment)."""
    model.train()
    n = len(data)
    order = torch.randperm(n, generator=gen, device=gen.device).to(data.x.device)
    steps = math.ceil(n / batch_size)
    loss_sum = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), dtype=torch.long, device=data.x.device)
    start = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        xb = data.x[idx].float().div_(255)  # (B, C, H, W) in 0..1
        yb = data.y[idx]
        if do_augment:
            xb = augment(xb, gen, erase=erase)
        logits = model(data.normalise(xb))
        loss = criterion(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # accumulate on the device; one sync per epoch instead of one per batch
        loss_sum += loss.detach() * yb.numel()
        correct += (logits.detach().argmax(1) == yb).sum()
        if progress is not None and progress.due(step + 1):  # reading the sums syncs: only when drawing
            seen = min((step + 1) * batch_size, n)
            progress.update(step + 1, float(loss_sum) / seen, int(correct) / seen, seen)
    if not math.isfinite(float(loss_sum)):
        raise FloatingPointError("training loss became NaN or infinite; lower --lr or change the loss")
    seconds = time.perf_counter() - start
    return {"loss": float(loss_sum) / n, "accuracy": int(correct) / n, "images_per_s": n / seconds, "seconds": seconds}


@torch.no_grad()
def evaluate(model, criterion, data: Batches, num_classes: int, tta_flip: bool = False,
             batch_size: int = 1000) -> dict:
    """Mean loss, the confusion matrix and the softmax probabilities over `data`."""
    model.eval()
    loss_sum = 0.0
    probs = []
    for i in range(0, len(data), batch_size):
        xb = data.normalise(data.x[i:i + batch_size].float().div_(255))
        yb = data.y[i:i + batch_size]
        logits = forward_logits(model, xb, tta_flip)
        loss_sum += float(criterion(logits, yb)) * yb.numel()
        probs.append(logits.softmax(1).cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, num_classes)
    cm = confusion_matrix(data.y.cpu(), p.argmax(1), num_classes)
    n = max(len(data), 1)
    return {"loss": loss_sum / n, "accuracy": float(cm.trace()) / n, "confusion_matrix": cm, "probs": p}


# --- checkpoints: tensors in safetensors, everything else in JSON; nothing is pickled ---------

def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class FitState:
    epoch: int = 0                  # epochs completed
    history: list = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    best_state: dict | None = None  # weights of the best epoch (early stopping keeps them)


def save_checkpoint(folder: Path, model, optimizer, scheduler, gen: torch.Generator, state: FitState) -> None:
    """Written to temporary names then renamed, so a kill leaves the previous checkpoint intact."""
    folder.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    if state.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in state.best_state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    tensors["meta.epoch"] = torch.tensor(state.epoch)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"epoch": state.epoch, "history": state.history, "best_val_loss": state.best_val_loss,
            "best_epoch": state.best_epoch, "bad_epochs": state.bad_epochs, "stopped_early": state.stopped_early,
            "scheduler_last_epoch": scheduler.last_epoch, "optimizer": opt_meta}
    try:
        (folder / "checkpoint.safetensors.tmp").write_bytes(save(tensors))  # plain I/O: a full disk raises OSError
        (folder / "checkpoint.json.tmp").write_text(json.dumps(meta))
    except OSError as e:
        raise OSError(e.errno, f"cannot write the training checkpoint in {folder}: {e.strerror} "
                      "(free space, or train with --no-checkpoint); nothing was published") from e
    # the JSON names the epoch; rename the tensors first so a kill between the two renames
    # leaves tensors newer than the JSON, which load_checkpoint detects by the epoch stamp
    (folder / "checkpoint.safetensors.tmp").replace(folder / "checkpoint.safetensors")
    (folder / "checkpoint.json.tmp").replace(folder / "checkpoint.json")


def load_checkpoint(folder: Path, model, optimizer, scheduler, gen: torch.Generator, device) -> FitState:
    tensors = load_file(folder / "checkpoint.safetensors", device="cpu")
    meta = json.loads((folder / "checkpoint.json").read_text())
    if int(tensors["meta.epoch"]) != meta["epoch"]:
        raise RuntimeError(f"checkpoint in {folder} is torn (tensors from epoch {int(tensors['meta.epoch'])}, "
                           f"JSON from epoch {meta['epoch']}); delete the folder to start over")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    model.to(device)
    _optimizer_from_flat(optimizer, {k: v.to(device) for k, v in tensors.items() if k.startswith("optim.")},
                         meta["optimizer"])
    scheduler.last_epoch = meta["scheduler_last_epoch"]
    scheduler._step_count = meta["scheduler_last_epoch"] + 1
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])
    best = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")} or None
    return FitState(meta["epoch"], meta["history"], meta["best_val_loss"], meta["best_epoch"],
                    meta["bad_epochs"], meta["stopped_early"], best)


def fit(model: nn.Module, criterion, optimizer, scheduler, train: Batches, val: Batches | None, cfg,
        num_classes: int, gen: torch.Generator, checkpoint_dir: Path | None = None,
        state: FitState | None = None, log=print) -> FitState:
    """Train for cfg.epochs (or until early stopping), keeping the weights of the best validation loss."""
    state = state or FitState()
    steps = math.ceil(len(train) / cfg.batch_size)
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        progress = Progress(steps, f"epoch {epoch}/{cfg.epochs}")
        tr = train_one_epoch(model, criterion, optimizer, scheduler, train, cfg.batch_size, gen, cfg.augment, progress,
                             erase=cfg.random_erase)
        progress.close()
        record = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                  "images_per_s": round(tr["images_per_s"], 1), "seconds": round(tr["seconds"], 3),
                  "lr": optimizer.param_groups[0]["lr"]}
        if val is not None and len(val):
            ev = evaluate(model, criterion, val, num_classes)
            record.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
            if ev["loss"] < state.best_val_loss:
                state.best_val_loss, state.best_epoch, state.bad_epochs = ev["loss"], epoch, 0
                state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state.bad_epochs += 1
                if cfg.patience and state.bad_epochs >= cfg.patience:
                    state.stopped_early = True
        state.history.append(record)
        state.epoch = epoch
        log(record)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, gen, state)
    if cfg.patience and state.best_state is not None:
        # early stopping's promise: the weights of the best validation epoch, not the last
        model.load_state_dict(state.best_state)
    return state


def fit_verdict(history: list[dict], underfit_accuracy: float, overfit_gap: float) -> dict:
    """Underfitting: train and validation both poor. Overfitting: train good, validation clearly
    worse (or validation loss rising from its minimum while training loss falls). Else a good fit."""
    last = history[-1]
    tr, va = last["train_accuracy"], last.get("val_accuracy")
    numbers = {"train_accuracy": round(tr, 4), "val_accuracy": None if va is None else round(va, 4),
               "underfit_accuracy": underfit_accuracy, "overfit_gap": overfit_gap}
    if va is None:
        return {"verdict": "unknown", "reason": "no validation split (val_fraction=0)", **numbers}
    gap = tr - va
    numbers["gap"] = round(gap, 4)
    val_losses = [h["val_loss"] for h in history]
    best = min(range(len(val_losses)), key=val_losses.__getitem__)
    rising = len(history) - 1 - best >= 2 and val_losses[-1] > val_losses[best] * 1.05
    if tr < underfit_accuracy and va < underfit_accuracy:
        return {"verdict": "underfitting", "reason": f"train {tr:.4f} and validation {va:.4f} accuracy are both "
                f"below {underfit_accuracy}: more capacity, epochs or learning rate", **numbers}
    if gap > overfit_gap or rising:
        why = (f"train accuracy {tr:.4f} exceeds validation {va:.4f} by {gap:.4f} > {overfit_gap}" if gap > overfit_gap
               else f"validation loss rose from {val_losses[best]:.4f} (epoch {best + 1}) to {val_losses[-1]:.4f}")
        return {"verdict": "overfitting", "reason": why + ": more data or augmentation, regularisation, early stopping",
                **numbers}
    return {"verdict": "good_fit", "reason": f"train {tr:.4f} and validation {va:.4f} accuracy are close "
            f"(gap {gap:.4f} <= {overfit_gap})", **numbers}
