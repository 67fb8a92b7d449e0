"""python -m training: the CLI behind `make train`: a real --dry-run subprocess, exit codes, error messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import artifacts
from core.models import build_model
from tests.conftest import tiny_manifest
from training.__main__ import main
from training.config import make_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--limit-train", "256", "--limit-test", "128", "--epochs", "1"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_subprocess_publishes_and_prints_where_and_how_well(tmp_path):
    r = _run("train", "--dry-run", "--model", "lenet", "--artifacts-dir", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    epochs = [json.loads(x) for x in lines if x.startswith("{")]
    assert [e["epoch"] for e in epochs] == [1]  # the dry run is one epoch, logged as a JSON line
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_s"} <= set(epochs[0])
    assert lines[0].startswith("training lenet on fashion_mnist (922 train / 102 val / 512 test) on cpu")
    assert re.fullmatch(r"fit: (underfitting|overfitting|good_fit) \(.+\)", lines[-3])
    published = re.fullmatch(r"published (.+)", lines[-2])
    assert published
    folder = Path(published.group(1))
    assert folder.parent == tmp_path / "art" / "lenet"
    m = artifacts.verify(folder).to_dict()
    acc = re.fullmatch(r"test accuracy (\d\.\d{4}) \((\d+)/(\d+)\), test loss (\d+\.\d{4}), trained in [\d.]+ s",
                       lines[-1])
    assert acc, lines[-1]
    assert int(acc.group(3)) == 512 and int(acc.group(2)) == sum(m["confusion_matrix"][i][i] for i in range(10))
    assert float(acc.group(1)) == pytest.approx(m["test_accuracy"], abs=5e-5)
    assert m["verdict"]["verdict"] in lines[-3]
    assert "\r" not in r.stderr  # no live progress bar when the output is not a terminal


def test_unknown_model_exits_2_with_the_known_names(tmp_path):
    r = _run("train", "--model", "vgg", *TINY, "--artifacts-dir", str(tmp_path))
    assert r.returncode == 2
    assert "error: unknown model 'vgg'; known models: cnn, gru, lenet, mlp, resnet" in r.stderr
    assert not list(tmp_path.rglob("manifest.json"))


@pytest.mark.parametrize("flag,value,message", [
    ("--loss", "hinge", "unknown loss 'hinge'; known losses: cross_entropy, weighted_cross_entropy, nll, focal, mse"),
    ("--optimizer", "lbfgs", "unknown optimizer 'lbfgs'; known optimizers: sgd, nesterov, adam, adamw, rmsprop"),
    ("--schedule", "exp", "unknown schedule 'exp'; known schedules: none, step, cosine, onecycle"),
    ("--dataset", "svhn", "unknown dataset 'svhn'; known datasets: cifar10, fashion_mnist, mnist"),
])
def test_unknown_names_exit_2_with_the_known_ones(tmp_path, capsys, flag, value, message):
    assert main(["train", "--model", "mlp", *TINY, "--artifacts-dir", str(tmp_path), flag, value]) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not list(tmp_path.rglob("manifest.json"))


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "epochs must be at least 1, got 0"),
    (["--batch-size", "-1"], "batch_size must be at least 1, got -1"),
    (["--limit-test", "0"], "limit_test must be at least 1, got 0"),
    (["--patience", "-1"], "patience must be 0 (off) or more epochs, got -1"),
    (["--model-kwargs", "[8]"], 'model_kwargs must be a JSON object such as {"widths": [16, 32]}, got an array'),
    (["--model-kwargs", '{"widths": [8]}'], "model 'mlp' takes no argument(s) widths; its arguments: hidden, dropout"),
])
def test_bad_values_are_one_error_line_not_a_traceback(tmp_path, capsys, args, message):
    assert main(["train", "--model", "mlp", *TINY, "--artifacts-dir", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not list(tmp_path.rglob("manifest.json"))


def test_unknown_settings_are_refused_by_name(capsys):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) epoch, lr_max; known: .*epochs.*lr"):
        make_config(epoch=3, lr_max=0.1)
    with pytest.raises(SystemExit) as e:
        main(["train", "--epoch", "3"])  # no abbreviation of --epochs
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--loss", "--optimizer", "--schedule", "--patience", "--resume", "--label-smoothing",
                 "--focal-gamma", "--seed", "--dry-run", "--deterministic", "--random-erase"):
        assert flag in out
    assert "lenet | cnn | resnet | gru | mlp" in out


def test_flags_reach_the_config_and_presets_never_beat_them(tmp_path, capsys):
    import argparse

    from training.__main__ import _add_config_flags, _config

    p = argparse.ArgumentParser()
    _add_config_flags(p)
    cfg = _config(p.parse_args(["--model", "lenet", "--epochs", "3", "--no-augment", "--class-weights", "1", "2",
                                "--model-kwargs", '{"hidden": [8]}', "--lr", "0.5"]))
    assert (cfg.model, cfg.epochs, cfg.augment, cfg.class_weights, cfg.model_kwargs, cfg.lr) == \
        ("lenet", 3, False, (1.0, 2.0), {"hidden": [8]}, 0.5)
    on = _config(p.parse_args(["--model", "resnet", "--deterministic", "--random-erase", "0.25"]))
    assert (on.deterministic, on.random_erase, on.epochs) == (True, 0.25, 18)  # flags beat the resnet preset
    assert (_config(p.parse_args([])).deterministic, _config(p.parse_args([])).random_erase) == (False, 0.0)
    with pytest.raises(ValueError, match=r"random_erase is a probability in \[0, 1\], got 1.5"):
        _config(p.parse_args(["--random-erase", "1.5"]))
    dry = _config(p.parse_args(["--dry-run", "--epochs", "2"]))
    assert (dry.limit_train, dry.limit_test, dry.epochs) == (1024, 512, 2)  # a given flag beats the dry run


def _publish(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model("mlp", 1, 4, 4, 3, hidden=[8])
    return artifacts.publish(root, "tiny", model.state_dict(), tiny_manifest(test_accuracy=0.5 + seed / 10))


def test_list_and_promote(tmp_path, capsys):
    assert main(["list", "--artifacts-dir", str(tmp_path)]) == 0
    assert "no versions" in capsys.readouterr().out
    a = _publish(tmp_path, 0)
    b = _publish(tmp_path, 1)
    assert main(["promote", "--artifacts-dir", str(tmp_path), "tiny", a.name]) == 0
    assert f"promoted tiny/{a.name}" in capsys.readouterr().out
    assert main(["list", "--artifacts-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert {f"* tiny/{a.name}", f"  tiny/{b.name}"} == {line.split("  test_accuracy")[0] for line in out}
    assert main(["promote", "--artifacts-dir", str(tmp_path), "tiny", "nope"]) == 2
    assert "no version 'nope'" in capsys.readouterr().err
    assert main(["promote", "--artifacts-dir", str(tmp_path), "../x", a.name]) == 2
    assert "invalid model name" in capsys.readouterr().err


def test_cv_command_prints_mean_and_sd(tmp_path, capsys):
    assert main(["cv", "--model", "mlp", "--limit-train", "300", "--epochs", "1", "--folds", "2",
                 "--artifacts-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"2-fold validation accuracy \d\.\d{4} ± \d\.\d{4} \(report in .+\)", out), out
