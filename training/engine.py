"""The loop: train_one_epoch() and evaluate() take tensors and return numbers; fit() runs epochs of
a Run with early stopping, and hands a checkpoint to training.checkpoint after each one. Nothing
here writes artifacts.

Data lives in memory as uint8 (N, C, H, W); each batch is sliced, scaled to 0..1, augmented as a
whole, normalised, and fed to the model. That removes the per-sample Python work of the classic
DataLoader + ToTensor + Normalize recipe.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from core.metrics import confusion_matrix
from core.models import forward_logits
from training.checkpoint import save_checkpoint
from training.data import augment
from training.progress import Progress
from training.run import Batches, FitState, Run


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
    """Mean loss, the confusion matrix, the softmax probabilities and the logits (N, K) over `data`.

    The logits are those the service computes (flip-averaged with tta_flip); training.calibrate fits
    the temperature on them."""
    model.eval()
    loss_sum = 0.0
    out = []
    for i in range(0, len(data), batch_size):
        xb = data.normalise(data.x[i:i + batch_size].float().div_(255))
        yb = data.y[i:i + batch_size]
        logits = forward_logits(model, xb, tta_flip)
        loss_sum += float(criterion(logits, yb)) * yb.numel()
        out.append(logits.cpu())
    z = torch.cat(out) if out else torch.zeros(0, num_classes)
    p = z.softmax(1)
    cm = confusion_matrix(data.y.cpu(), p.argmax(1), num_classes)
    n = max(len(data), 1)
    return {"loss": loss_sum / n, "accuracy": float(cm.trace()) / n, "confusion_matrix": cm, "probs": p, "logits": z}


def fit(run: Run, cfg, checkpoint_dir: Path | None = None, state: FitState | None = None, log=print) -> FitState:
    """Train for cfg.epochs (or until early stopping), keeping the weights of the best validation loss."""
    state = state or FitState()
    model, optimizer = run.model, run.optimizer
    steps = math.ceil(len(run.train) / cfg.batch_size)
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        progress = Progress(steps, f"epoch {epoch}/{cfg.epochs}")
        tr = train_one_epoch(model, run.criterion, optimizer, run.scheduler, run.train, cfg.batch_size,
                             run.generator, cfg.augment, progress, erase=cfg.random_erase)
        progress.close()
        record = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                  "images_per_s": round(tr["images_per_s"], 1), "seconds": round(tr["seconds"], 3),
                  "lr": optimizer.param_groups[0]["lr"]}
        if len(run.val):
            ev = evaluate(model, run.criterion, run.val, run.num_classes)
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
            save_checkpoint(checkpoint_dir, run, state)
    if cfg.patience and state.best_state is not None:
        # early stopping's promise: the weights of the best validation epoch, not the last
        model.load_state_dict(state.best_state)
    return state
