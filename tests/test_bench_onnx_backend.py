"""bench.onnx_backend: a short run on the session's LeNet gives the table and JSON; a version published
before model.onnx existed is exported on the fly."""

from __future__ import annotations

import json
import shutil

from bench import onnx_backend


def test_short_run_writes_results_and_both_backends_agree(lenet_version, tmp_path, capsys):
    root, name, version, _ = lenet_version
    result = onnx_backend.main(["--models", name, "--artifacts-dir", str(root), "--rounds", "2", "--seconds", "0.05",
                                "--batches", "1", "8", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "onnx_backend.json").read_text()) == json.loads(json.dumps(result))
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [(name, 1), (name, 8)]
    assert all(r["torch_ms"] > 0 and r["onnx_ms"] > 0 for r in result["rows"])
    out = capsys.readouterr().out
    assert "largest probability difference torch vs onnx" in out and "| lenet | 8 |" in out


def test_a_version_without_model_onnx_is_exported_on_the_fly(lenet_version, tmp_path):
    root, name, version, _ = lenet_version
    old = tmp_path / "art" / name / version
    shutil.copytree(root / name / version, old)
    raw = json.loads((old / "manifest.json").read_text())
    del raw["onnx"], raw["files"]["model.onnx"]
    (old / "model.onnx").unlink()
    (old / "manifest.json").write_text(json.dumps(raw))
    result = onnx_backend.main(["--models", name, "--artifacts-dir", str(tmp_path / "art"), "--rounds", "1",
                                "--seconds", "0.02", "--batches", "2", "--out", str(tmp_path / "out")])
    assert result["rows"][0]["onnx_ms"] > 0
