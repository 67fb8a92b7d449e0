"""training/engine.py: the loop and early stopping with the best weights; with training/checkpoint.py,
checkpoints that resume to the same weights as an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from core.models import build_model
from training import engine, progress
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import make_config
from training.data import Dataset
from training.engine import evaluate, fit, train_one_epoch
from training.losses import LOSSES, build_loss
from training.optim import OPTIMIZERS, build_optimizer, build_schedule
from training.run import Batches, Run

K = 4


def _data(n: int, seed: int, labels: torch.Tensor | None = None) -> Batches:
    """8x8 images whose class is the bright quadrant, plus noise: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g) if labels is None else labels
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for q in range(K):
        r, c = divmod(q, 2)
        x[y == q, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 150
    return Batches(x, y, torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.3))


def _setup(**over):
    base = dict(model="mlp", model_kwargs={"hidden": [32]}, epochs=3, batch_size=32, optimizer="adam", lr=1e-2,
                weight_decay=0.0, schedule="none", augment=False, seed=0)
    cfg = make_config(**{**base, **over})
    torch.manual_seed(cfg.seed)
    train, val = _data(256, 1), _data(128, 2)
    model = build_model(cfg.model, 1, 8, 8, K, **cfg.model_kwargs)
    crit = build_loss(cfg, train.y, K)
    opt = build_optimizer(cfg, model.parameters())
    sched = build_schedule(cfg, opt, -(-len(train) // cfg.batch_size))
    ds = Dataset("quadrants", [str(k) for k in range(K)], train.x, train.y, val.x, val.y, "memory")
    return cfg, Run(ds, torch.device("cpu"), train, val, val, model, crit, opt, sched,
                    torch.Generator().manual_seed(cfg.seed), {})


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_one_epoch_and_evaluate_return_numbers():
    _, run = _setup()
    tr = train_one_epoch(run.model, run.criterion, run.optimizer, run.scheduler, run.train, 32, run.generator,
                         do_augment=False)
    assert set(tr) == {"loss", "accuracy", "images_per_s", "seconds"} and 0 <= tr["accuracy"] <= 1
    ev = evaluate(run.model, run.criterion, run.val, K)
    cm = ev["confusion_matrix"]
    assert cm.shape == (K, K) and int(cm.sum()) == 128
    assert ev["accuracy"] == float(cm.trace()) / 128
    assert ev["probs"].shape == (128, K) and torch.allclose(ev["probs"].sum(1), torch.ones(128))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_by_name(loss):
    cfg, run = _setup(loss=loss, epochs=4)
    st = fit(run, cfg, log=lambda r: None)
    h = st.history
    assert h[-1]["train_loss"] < h[0]["train_loss"] and h[-1]["val_accuracy"] > 0.5


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_by_name(optimizer):
    lr = {"sgd": 0.1, "nesterov": 0.1, "rmsprop": 1e-3}.get(optimizer, 1e-2)
    cfg, run = _setup(optimizer=optimizer, lr=lr, epochs=4, schedule="cosine")
    st = fit(run, cfg, log=lambda r: None)
    assert st.history[-1]["train_loss"] < st.history[0]["train_loss"] and st.history[-1]["val_accuracy"] > 0.5


def test_early_stopping_counts_epochs_without_improvement_and_keeps_the_best_weights(monkeypatch):
    scripted = iter([1.0, 0.9, 0.95, 0.85, 0.9, 0.91, 0.92, 0.1, 0.1, 0.1])
    snapshots = []

    def fake_evaluate(model, criterion, data, num_classes, *a, **kw):
        snapshots.append(_weights(model))
        return {"loss": next(scripted), "accuracy": 0.5}

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    cfg, run = _setup(epochs=10, patience=2)
    model = run.model
    st = fit(run, cfg, log=lambda r: None)
    # best at epochs 2 and 4; epochs 5 and 6 bring no improvement -> stop after epoch 6
    assert st.stopped_early and st.epoch == 6 and len(st.history) == 6
    assert st.best_epoch == 4 and st.best_val_loss == 0.85
    assert [h["val_loss"] for h in st.history] == [1.0, 0.9, 0.95, 0.85, 0.9, 0.91]
    assert not _same(snapshots[3], snapshots[5])
    assert _same(_weights(model), snapshots[3])  # the weights of epoch 4, not of the last epoch


def test_without_patience_every_epoch_runs_and_the_last_weights_stay(monkeypatch):
    losses = iter([0.5, 0.6, 0.7, 0.8])
    snapshots = []

    def fake_evaluate(model, *a, **kw):
        snapshots.append(_weights(model))
        return {"loss": next(losses), "accuracy": 0.5}

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    cfg, run = _setup(epochs=4, patience=0)
    model = run.model
    st = fit(run, cfg, log=lambda r: None)
    assert not st.stopped_early and st.epoch == 4 and st.best_epoch == 1
    assert _same(_weights(model), snapshots[-1])


def test_early_stopping_on_a_real_rising_validation_loss():
    # validation labels contradict training labels, so validation loss is best after epoch 1 and rises
    cfg, run = _setup(epochs=20, patience=2, lr=3e-2)
    val = _data(128, 2)
    val = Batches(val.x, (val.y + 1) % K, val.mean, val.std)
    run = dataclasses.replace(run, val=val)
    model, crit = run.model, run.criterion
    st = fit(run, cfg, log=lambda r: None)
    assert st.stopped_early and st.epoch == st.best_epoch + 2 < 20
    best = st.history[st.best_epoch - 1]["val_loss"]
    assert best == min(h["val_loss"] for h in st.history) < st.history[-1]["val_loss"]
    assert evaluate(model, crit, val, K)["loss"] == pytest.approx(best, rel=1e-6)  # best weights restored


class _Tty:
    tty = True

    def __init__(self):
        self.writes = 0

    def isatty(self):
        return self.tty

    def write(self, text):
        self.writes += 1

    def flush(self):
        pass


def test_the_progress_bar_reads_the_device_sums_only_when_it_draws(monkeypatch):
    # reading loss/accuracy off the device is a host sync: a live bar may do it at most every 0.1 s
    # (and at the last step), a bar that is not on a terminal never
    pipe = _Tty()
    pipe.tty = False
    assert not progress.Progress(10, "x", stream=pipe).due(1)
    clock = iter([0.0, 100.0, 100.01, 100.02, 100.2, 100.3])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.Progress(10, "x", stream=_Tty())  # start 0.0
    assert bar.due(1)          # 100.0: first draw is due
    bar.last_draw = 100.0
    assert not bar.due(2)      # 100.01: within 0.1 s of the last draw
    assert bar.due(10)         # the last step always draws
    assert bar.due(3)          # 100.2


def test_a_live_progress_bar_draws_less_than_once_per_step():
    _, run = _setup()
    stream = _Tty()
    steps = -(-len(run.train) // 8)
    bar = progress.Progress(steps, "epoch 1/1", stream=stream)
    train_one_epoch(run.model, run.criterion, run.optimizer, run.scheduler, run.train, 8, run.generator,
                    do_augment=False, progress=bar)
    assert 1 <= stream.writes < steps  # 32 steps of a tiny model take far less than 3.2 s


@pytest.mark.parametrize("optimizer,schedule", [("adam", "onecycle"), ("sgd", "step"), ("rmsprop", "cosine")])
def test_resume_from_a_checkpoint_gives_the_same_weights(tmp_path, optimizer, schedule):
    # dropout (global RNG), augmentation (data generator), optimizer state and the schedule all matter here
    over = dict(optimizer=optimizer, schedule=schedule, lr=1e-2 if optimizer != "rmsprop" else 1e-3, epochs=3,
                augment=True, step_size=1, model_kwargs={"hidden": [32], "dropout": 0.3}, patience=5)
    cfg, run = _setup(**over)
    fit(run, cfg, log=lambda r: None)
    uninterrupted = _weights(run.model)

    ck = tmp_path / "ck"
    cfg, run = _setup(**over)
    fit(run, dataclasses.replace(cfg, epochs=1), checkpoint_dir=ck, log=lambda r: None)
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]  # nothing pickled

    cfg, run = _setup(**over)  # a fresh process would rebuild all of this
    st = load_checkpoint(ck, run)
    assert st.epoch == 1 and len(st.history) == 1
    st = fit(run, cfg, state=st, log=lambda r: None)
    assert st.epoch == 3
    assert _same(_weights(run.model), uninterrupted)


def test_a_torn_checkpoint_is_detected(tmp_path):
    cfg, run = _setup(epochs=1)
    st = fit(run, cfg, checkpoint_dir=tmp_path, log=lambda r: None)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["epoch"] = 0
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="torn"):
        load_checkpoint(tmp_path, run)
    save_checkpoint(tmp_path, run, st)
    assert load_checkpoint(tmp_path, run).epoch == 1
