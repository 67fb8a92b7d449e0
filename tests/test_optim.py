"""training/optim.py: every optimizer and schedule by name; a few steps lower the loss on a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.models import build_model
from training.config import make_config
from training.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule

LR = {"sgd": 0.05, "nesterov": 0.05, "adam": 3e-3, "adamw": 3e-3, "rmsprop": 1e-3}


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)


def _steps(cfg, n: int = 8, steps_per_epoch: int = 8) -> tuple[float, float, list[float]]:
    torch.manual_seed(0)
    model = build_model("mlp", 1, 28, 28, 10, hidden=[64], dropout=0.0)
    opt = build_optimizer(cfg, model.parameters())
    sched = build_schedule(cfg, opt, steps_per_epoch)
    x, y = _batch()
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        last = float(F.cross_entropy(model(x), y))
    return first, last, lrs


def test_the_registries_hold_the_names_of_the_issue():
    assert set(OPTIMIZERS) == {"sgd", "nesterov", "adam", "adamw", "rmsprop"}
    assert set(SCHEDULES) == {"none", "step", "cosine", "onecycle"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss_on_a_fixed_batch(name):
    first, last, _ = _steps(make_config(optimizer=name, lr=LR[name], schedule="none", weight_decay=0.0, epochs=1))
    assert last < 0.5 * first, (name, first, last)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_lowers_the_loss_on_a_fixed_batch(schedule):
    cfg = make_config(optimizer="adam", lr=3e-3, schedule=schedule, weight_decay=0.0, epochs=2, step_size=1)
    first, last, _ = _steps(cfg, n=16)
    assert last < 0.5 * first, (schedule, first, last)


def test_optimizer_settings_reach_torch():
    model = build_model("mlp", 1, 4, 4, 3)
    o = build_optimizer(make_config(optimizer="nesterov", lr=0.2, momentum=0.8, weight_decay=1e-4), model.parameters())
    assert isinstance(o, torch.optim.SGD)
    g = o.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.2, 0.8, True, 1e-4)
    assert isinstance(build_optimizer(make_config(optimizer="adamw"), model.parameters()), torch.optim.AdamW)
    assert isinstance(build_optimizer(make_config(optimizer="rmsprop"), model.parameters()), torch.optim.RMSprop)


def test_schedule_shapes_per_batch():
    # 2 epochs of 4 batches = 8 steps at peak lr 1.0
    def lrs(schedule):
        return _steps(make_config(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, schedule=schedule,
                                  epochs=2, step_size=1, gamma=0.5), n=8, steps_per_epoch=4)[2]

    assert lrs("none") == [1.0] * 8
    assert lrs("step") == [1.0] * 4 + [0.5] * 4  # decays by gamma every step_size epochs
    cos = lrs("cosine")
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)])
    # one-cycle: linear warm-up over the first 25% of steps to the peak, then linear decay to 0
    assert lrs("onecycle") == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_unknown_names_list_the_known_ones():
    model = build_model("mlp", 1, 4, 4, 3)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'; known optimizers: sgd, nesterov, adam"):
        build_optimizer(make_config(optimizer="lbfgs"), model.parameters())
    opt = build_optimizer(make_config(), model.parameters())
    with pytest.raises(ValueError, match="unknown schedule 'exp'; known schedules: none, step, cosine, onecycle"):
        build_schedule(make_config(schedule="exp"), opt, 10)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps_per_epoch", [1, 2, 3])
def test_schedules_survive_runs_of_very_few_steps(schedule, steps_per_epoch):
    # a one-epoch run on fewer images than a batch is one step: one-cycle divided by zero here once
    cfg = make_config(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, schedule=schedule, epochs=1)
    _, _, lrs = _steps(cfg, n=steps_per_epoch, steps_per_epoch=steps_per_epoch)
    assert all(0.0 <= lr <= 1.0 for lr in lrs) and lrs[0] > 0
