"""bench/gpu_train.py on the CPU: a clear one-line refusal without CUDA, and the JSON and table rows of a
tiny run of the real script (the GPU run itself happens on the device machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_train

ROOT = Path(__file__).resolve().parent.parent
NARROW = '--model-kwargs \'{"widths": [8, 16, 32], "channels_last": true, "train_bf16": true}\''
RUN_KEYS = {"model", "seed", "device", "parameters", "epochs", "training_seconds", "loop_seconds", "wall_seconds",
            "test_accuracy", "test_images", "test_is_full_official_set", "weights_sha256", "command"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_train", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_fails_with_one_line():
    r = _run()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: bench.gpu_train needs a CUDA GPU")


def test_a_tiny_cpu_run_prints_one_json_and_writes_the_table(tmp_path):
    # one real training command (resnet; cnn runs through the same code), without the checks (tested on
    # their own below): each command takes from 15 s on a quiet machine to minutes on two busy cores
    out = tmp_path / "gpu_train.json"
    r = _run("--device", "cpu", "--dry-run", "--skip-checks", "--cnn-seeds", "--extra", NARROW, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout)  # stdout is the JSON alone; progress went to stderr
    assert printed == json.loads(out.read_text())
    assert printed["device"] == "cpu" and printed["gpu"] is None and printed["torch"] == torch.__version__
    assert printed["settings"]["epochs"] == 1 and printed["settings"]["limit_train"] == 512
    assert printed["preset_runs"] is False and printed["failed"] == []
    assert [(x["model"], x["seed"]) for x in printed["runs"]] == [("resnet", 0)]
    for x in printed["runs"]:
        assert RUN_KEYS <= set(x) and x["epochs"] == 1 and x["test_images"] == 256
        assert 0 < x["loop_seconds"] <= x["training_seconds"] <= x["wall_seconds"]
        assert "--device cpu" in x["command"]
    s = {x["model"]: x for x in printed["summary"]}
    assert list(s) == ["resnet"] and s["resnet"]["n"] == 1 and s["resnet"]["accuracy_sd"] is None
    assert s["resnet"]["target"] == {"accuracy_mean_at_least": 0.95, "training_seconds_at_most": 60.0, "met": None}
    assert printed["checks"] == {}
    md = out.with_suffix(".md").read_text()
    assert "| resnet (this repo) | cpu | 44,226 | 1 |" in md and "not judged" in md
    rendered = _run("--render", str(out), "--out", str(tmp_path / "again.json"))
    assert rendered.returncode == 0 and rendered.stdout.strip() == md.strip()


def _fake(model: str, acc: float, seconds: float, full: bool = True) -> dict:
    return {"model": model, "seed": 0, "parameters": 1, "epochs": 1, "test_accuracy": acc,
            "training_seconds": seconds, "loop_seconds": seconds, "wall_seconds": seconds + 5,
            "test_is_full_official_set": full}


def test_targets_are_judged_on_the_mean_and_the_slowest_run():
    ok = gpu_train.summarise([_fake("resnet", 0.951, 50), _fake("resnet", 0.952, 59)], preset_runs=True)
    assert ok[0]["target"]["met"] is True and ok[0]["accuracy_mean"] == 0.9515
    slow = gpu_train.summarise([_fake("resnet", 0.96, 50), _fake("resnet", 0.96, 61)], preset_runs=True)
    assert slow[0]["target"]["met"] is False
    cnn = gpu_train.summarise([_fake("cnn", 0.929, 4)], preset_runs=True)
    assert cnn[0]["target"]["met"] is False and cnn[0]["accuracy_sd"] is None
    tiny = gpu_train.summarise([_fake("cnn", 0.99, 1, full=False)], preset_runs=True)
    assert tiny[0]["target"]["met"] is None  # a partial test set never meets a target


def test_the_determinism_check_compares_two_deterministic_runs(monkeypatch):
    commands = []

    def fake_run(cmd):
        commands.append(cmd)
        return {"weights_sha256": "same"}

    monkeypatch.setattr(gpu_train, "run_one", fake_run)
    det = gpu_train.determinism_check("cuda", ["--no-augment"], {"epochs": None, "limit_train": None,
                                                                 "limit_test": None})
    assert det == {"same_weights": True, "weights_sha256": ["same", "same"], "epochs": 1, "limit_train": 4096,
                   "limit_test": 1000}
    assert len(commands) == 2 and commands[0] == commands[1]
    text = " ".join(commands[0])
    assert "--model resnet" in text and "--device cuda" in text and "--deterministic" in text
    assert text.endswith("--no-augment") and "--limit-train 4096" in text

    hashes = iter(["a", "b"])
    monkeypatch.setattr(gpu_train, "run_one", lambda cmd: {"weights_sha256": next(hashes)})
    assert gpu_train.determinism_check("cuda", [], {})["same_weights"] is False

    def failing(cmd):
        raise RuntimeError("python -m training train ... failed (2):\nerror: adaptive_max_pool2d_backward_cuda "
                           "does not have a deterministic implementation")

    monkeypatch.setattr(gpu_train, "run_one", failing)
    det = gpu_train.determinism_check("cuda", [], {})
    assert det["same_weights"] is None and "does not have a deterministic implementation" in det["error"]


def test_the_table_reports_failed_runs_and_checks():
    result = {"created_at": "2026-12-01T00:00:00Z", "command": "python -m bench.gpu_train", "torch": "2.11.0",
              "gpu": "NVIDIA H200", "device": "cuda",
              "summary": gpu_train.summarise([_fake("resnet", 0.951, 50)], preset_runs=True),
              "checks": {"host_syncs": {"limit_train": 8192, "device_generator": {"steps": 15, "host_syncs": 3},
                                        "cpu_generator": {"steps": 15, "host_syncs": 49}},
                         "determinism": {"same_weights": None, "error": "RuntimeError: no"}},
              "failed": [{"model": "resnet", "seed": 1, "error": "failed (1):\nCUDA out of memory"}]}
    md = gpu_train.markdown(result)
    assert "| resnet (this repo) | NVIDIA H200 | 1 | 1 | 50.0, 50.0 |" in md and "| 0.9510 | 1 seed | yes" in md
    assert "(15 steps): 3 with the generator on the GPU, 49 with a CPU generator" in md
    assert "--deterministic, twice: failed: RuntimeError: no." in md
    assert "FAILED: resnet seed 1: CUDA out of memory." in md
