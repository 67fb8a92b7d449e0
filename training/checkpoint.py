"""Resumable checkpoints of a run: tensors in safetensors, everything else in JSON; nothing is pickled.

A checkpoint holds the `state_dict()` of the model, the optimizer and the schedule, the weights of
the best epoch, fit()'s bookkeeping, and every random state a resumed run needs to draw the same
numbers as an uninterrupted one (torch's CPU generator, the CUDA generators, the data generator).

    folder/checkpoint.safetensors   model.*, best.*, optimizer.*, scheduler.*, rng.*, meta.epoch
    folder/checkpoint.json          fit state, and the optimizer's and schedule's non-tensor state
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from training.run import FitState, Run

FORMAT = 2    # 1: before state_dict()s (optimizer flattened by hand, schedule as two integers)
TENSOR = "__tensor__"  # JSON stand-in for a tensor stored in the safetensors file under this key


def _split(obj, key: str, tensors: dict[str, torch.Tensor]):
    """`obj` (a state_dict) for JSON: each tensor moves into `tensors` under its dotted path."""
    if torch.is_tensor(obj):
        tensors[key] = obj
        return {TENSOR: key}
    if isinstance(obj, dict):
        return {k: _split(v, f"{key}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):  # tuples come back as lists (Adam's betas): torch accepts both
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of _split: the tensors back in their places."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR}:
            return tensors[obj[TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _optimizer_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    sd = _join(meta, tensors)
    # JSON made the per-parameter keys strings; load_state_dict matches them to parameters as ints
    sd["state"] = {int(k): v for k, v in sd["state"].items()}
    return sd


def save_checkpoint(folder: Path, run: Run, state: FitState) -> None:
    """Written to temporary names then renamed, so a kill leaves the previous checkpoint intact."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    if state.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in state.best_state.items()})
    optimizer = _split(run.optimizer.state_dict(), "optimizer", tensors)
    scheduler = _split(run.scheduler.state_dict(), "scheduler", tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = run.generator.get_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors["meta.epoch"] = torch.tensor(state.epoch)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "epoch": state.epoch, "history": state.history, "best_val_loss": state.best_val_loss,
            "best_epoch": state.best_epoch, "bad_epochs": state.bad_epochs, "stopped_early": state.stopped_early,
            "optimizer": optimizer, "scheduler": scheduler}
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


def load_checkpoint(folder: Path, run: Run) -> FitState:
    """Restore `run` (model, optimizer, schedule, random states) in place; returns fit()'s state."""
    tensors = load_file(folder / "checkpoint.safetensors", device="cpu")
    meta = json.loads((folder / "checkpoint.json").read_text())
    if meta.get("format", 1) != FORMAT:
        raise RuntimeError(f"checkpoint in {folder} has format {meta.get('format', 1)}, this code reads {FORMAT}; "
                           "delete the folder to start over")
    if int(tensors["meta.epoch"]) != meta["epoch"]:
        raise RuntimeError(f"checkpoint in {folder} is torn (tensors from epoch {int(tensors['meta.epoch'])}, "
                           f"JSON from epoch {meta['epoch']}); delete the folder to start over")
    run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    run.model.to(run.device)
    # optimizer state onto the parameters' device; load_state_dict keeps Adam's `step` where torch wants it
    on_device = {k: v.to(run.device) for k, v in tensors.items() if k.startswith("optimizer.")}
    run.optimizer.load_state_dict(_optimizer_state(meta["optimizer"], on_device))
    run.scheduler.load_state_dict(_join(meta["scheduler"], tensors))
    torch.set_rng_state(tensors["rng.torch"])
    run.generator.set_state(tensors["rng.data"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda:  # absent when written without CUDA: the run then continues from the current CUDA state
        torch.cuda.set_rng_state_all(cuda)
    best = {k[5:]: v.to(run.device) for k, v in tensors.items() if k.startswith("best.")} or None
    return FitState(meta["epoch"], meta["history"], meta["best_val_loss"], meta["best_epoch"],
                    meta["bad_epochs"], meta["stopped_early"], best)
