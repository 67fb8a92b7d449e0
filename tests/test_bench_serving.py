"""bench/serving.py's choice of version: `make bench` right after `make train` benchmarks what exists,
and with nothing to benchmark it says what to run in one line (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.serving import choose_model
from core import artifacts
from core.models import build_model
from tests.conftest import tiny_manifest

ROOT = Path(__file__).resolve().parent.parent


def _publish(root: Path, name: str) -> None:
    m = tiny_manifest()
    model = build_model("mlp", 1, 4, 4, 3, hidden=(8,))
    artifacts.publish(root, name, model.state_dict(), m)


def test_the_model_asked_for_else_lenet_else_what_make_train_made(tmp_path, monkeypatch):
    monkeypatch.delenv("MODEL_NAME", raising=False)
    _publish(tmp_path, "cnn")  # what `make train` makes
    assert choose_model(str(tmp_path), None) == "cnn"
    _publish(tmp_path, "mlp")
    monkeypatch.setenv("MODEL_NAME", "mlp")  # `make train MODEL=mlp` exports MODEL_NAME=mlp
    assert choose_model(str(tmp_path), None) == "mlp"
    _publish(tmp_path, "lenet")
    assert choose_model(str(tmp_path), None) == "lenet"  # the README's figures are lenet's
    assert choose_model(str(tmp_path), "cnn") == "cnn"   # BENCH_MODEL / --model-name / make bench MODEL=cnn


def test_nothing_to_benchmark_is_one_line_naming_make_train(tmp_path):
    env = {**os.environ, "ARTIFACTS_DIR": str(tmp_path / "empty"), "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_MODEL", None)
    r = subprocess.run([sys.executable, "-m", "bench", "serving"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no trained version under") and "make train" in lines[0]


def test_an_unknown_model_asked_for_is_one_line(tmp_path):
    _publish(tmp_path, "cnn")
    env = {**os.environ, "ARTIFACTS_DIR": str(tmp_path), "BENCH_MODEL": "lenet", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "bench", "serving"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: no versions of model 'lenet' under {tmp_path.resolve()}; run "
                                             "`make train` first (models there: cnn)"]
