"""training/checkpoint.py: state_dict()s in safetensors + JSON, and the CUDA random states (faked here
on CPU: the GPU path must save them when CUDA is there and tolerate checkpoints written without)."""

from __future__ import annotations

import json

import pytest
import torch

from core.models import build_model
from training import checkpoint
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import make_config
from training.data import Dataset
from training.losses import build_loss
from training.optim import build_optimizer, build_schedule
from training.run import Batches, FitState, Run


def _run(seed: int = 0) -> tuple:
    cfg = make_config(model="mlp", model_kwargs={"hidden": [8]}, optimizer="adam", lr=1e-2, schedule="onecycle",
                      epochs=2, batch_size=8)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = Batches(torch.randint(0, 256, (16, 1, 4, 4), generator=g, dtype=torch.uint8),
                   torch.randint(0, 3, (16,), generator=g), torch.full((1, 1, 1, 1), 0.5),
                   torch.full((1, 1, 1, 1), 0.25))
    ds = Dataset("tiny", ["a", "b", "c"], data.x, data.y, data.x, data.y, "memory")
    model = build_model(cfg.model, 1, 4, 4, 3, **cfg.model_kwargs)
    opt = build_optimizer(cfg, model.parameters())
    return cfg, Run(ds, torch.device("cpu"), data, data, data, model, build_loss(cfg, data.y, 3), opt,
                    build_schedule(cfg, opt, 2), torch.Generator().manual_seed(seed), {})


def _step(run: Run, n: int) -> None:
    for _ in range(n):
        run.criterion(run.model(run.train.normalise(run.train.x.float() / 255)), run.train.y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        run.scheduler.step()


def test_optimizer_and_schedule_come_back_through_their_state_dicts(tmp_path):
    _, a = _run()
    _step(a, 3)
    save_checkpoint(tmp_path, a, FitState(epoch=1))
    _, b = _run(seed=1)
    load_checkpoint(tmp_path, b)
    assert b.scheduler.state_dict() == a.scheduler.state_dict()  # _step_count included, not set by hand
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == [dict(g, betas=tuple(g["betas"])) for g in sb["param_groups"]]
    assert sa["state"].keys() == sb["state"].keys()
    assert all(torch.equal(sa["state"][p][k], sb["state"][p][k]) for p in sa["state"] for k in sa["state"][p])
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["scheduler"]["last_epoch"] == 3 and meta["format"] == checkpoint.FORMAT


def test_cuda_random_states_are_saved_and_restored(tmp_path, monkeypatch):
    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    _, run = _run()
    save_checkpoint(tmp_path, run, FitState(epoch=1))
    load_checkpoint(tmp_path, run)
    assert len(restored) == 2 and all(torch.equal(r, s) for r, s in zip(restored, states))


def test_a_checkpoint_written_without_cuda_loads_on_a_cuda_machine(tmp_path, monkeypatch):
    _, run = _run()
    save_checkpoint(tmp_path, run, FitState(epoch=1))  # CPU here: no CUDA states in the file
    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", called.append)
    assert load_checkpoint(tmp_path, run).epoch == 1
    assert called == []


def test_a_checkpoint_of_the_old_layout_is_refused_clearly(tmp_path):
    _, run = _run()
    save_checkpoint(tmp_path, run, FitState(epoch=1))
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    del meta["format"]
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="has format 1, .* delete the folder to start over"):
        load_checkpoint(tmp_path, run)
