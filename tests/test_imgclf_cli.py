"""imgclf_cli.py: the `imgclf` console command that `make setup` installs into the venv (pip install -e .)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import artifacts
from core.models import build_model
from imgclf_cli import COMMANDS, main
from tests.conftest import tiny_manifest

SCRIPT = Path(sys.executable).with_name("imgclf")


def _imgclf(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: run `make setup` (it installs the project with pip install -e .)"
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_help_names_every_command_from_any_folder(tmp_path):
    r = _imgclf("--help", cwd=tmp_path)  # outside the checkout: the installed package, not the working folder
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: imgclf COMMAND")
    for command in ("train", "list", "promote", "aliases", "rollback", "compare", "serve"):
        assert f"\n  {command} " in r.stdout


def test_list_shows_the_published_versions(tmp_path):
    torch.manual_seed(0)
    folder = artifacts.publish(tmp_path / "art", "tiny", build_model("mlp", 1, 4, 4, 3, hidden=[8]).state_dict(),
                               tiny_manifest())
    r = _imgclf("list", "--artifacts-dir", "art", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"  tiny/{folder.name}  test_accuracy 0.5000  mlp")


def test_dispatch_passes_flags_and_exit_codes_through(tmp_path, capsys):
    assert main(["list", "--artifacts-dir", str(tmp_path)]) == 0
    assert "no versions" in capsys.readouterr().out
    assert main(["promote", "--artifacts-dir", str(tmp_path), "tiny", "nope"]) == 2  # training's exit code
    assert main(["nope"]) == 2
    assert capsys.readouterr().err.endswith(f"error: unknown command 'nope'; known: {', '.join(COMMANDS)} "
                                            "(imgclf --help)\n")
    assert main([]) == 2 and "usage: imgclf" in capsys.readouterr().err


def test_serve_with_a_bad_port_is_one_line(monkeypatch, capsys):
    from service import settings

    def execve(*args):  # a regression must fail here, not replace the test process with `bentoml serve`
        raise AssertionError(f"bentoml would have started: {args[1]}")

    monkeypatch.setattr(os, "execve", execve)
    settings.get()  # settings read (and cached) before the variable changes, as any earlier import does
    monkeypatch.setenv("PORT", "http")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == "error: PORT must be a port number 1..65535, got 'http'\n"


def test_service_cli_bad_setting_is_one_line_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PORT"} | {"PORT": "abc"}
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve"], cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=120, env=env)
    assert (r.returncode, r.stderr) == (2, "error: PORT must be a port number 1..65535, got 'abc'\n")


def test_train_help_is_the_training_cli(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out
