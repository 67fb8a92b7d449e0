"""bench/serving.py: its choice of version (`make bench` right after `make train` benchmarks what exists,
and with nothing to benchmark it says what to run in one line, no traceback), its comparison with the
faster of the two hand-written baselines, and a tiny real run."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.serving import choose_model, summarise, table
from bench.serving import main as serving_main
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


# --- the comparison: the service against the faster of the two hand-written baselines -------------------

def _run(target, rnd, conns, rps, p99, non_2xx=0):
    return {"target": target, "round": rnd, "connections": conns, "requests_per_s": rps, "p50_ms": p99 / 2,
            "p99_ms": p99, "requests": int(rps), "non_2xx": non_2xx, "socket_errors": 0}


def test_each_row_compares_with_the_faster_baseline_and_names_both():
    sides = {"service": {"workers": 2, "settings": "bentoml serve, 2 workers"},
             "baseline_1p": {"workers": 1, "settings": "1 process"},
             "baseline_2p": {"workers": 2, "settings": "2 processes"}}
    runs = []
    for rnd, noise in ((1, 1.0), (2, 0.5), (3, 1.1)):  # round 2 ran on a busy machine: every side halved
        runs += [_run("service", rnd, 1, 900 * noise, 2.0), _run("baseline_1p", rnd, 1, 1000 * noise, 1.0),
                 _run("baseline_2p", rnd, 1, 800 * noise, 1.5),
                 _run("service", rnd, 64, 3000 * noise, 30.0, non_2xx=1),
                 _run("baseline_1p", rnd, 64, 1000 * noise, 90.0), _run("baseline_2p", rnd, 64, 2000 * noise, 60.0)]
    args = argparse.Namespace(connections=[1, 64], model_name="lenet", rounds=3, duration=10, warmup=2,
                              evaluate_requests=0)
    res = summarise(runs, [25_000.0], args, "v1", sides)
    one, many = res["rows"]
    assert one["baseline"] == "baseline_1p" and many["baseline"] == "baseline_2p"  # the faster one, per row
    assert one["rps_ratio"] == pytest.approx(0.9) and one["p99_ratio"] == pytest.approx(2.0)
    assert many["rps_ratio"] == pytest.approx(1.5) and many["p99_ratio"] == pytest.approx(0.5)
    assert many["service_non_2xx"] == 3 and many["baseline_2p_non_2xx"] == 0
    text = table(res)
    assert "baseline 1p req/s | baseline 2p req/s" in text  # both baselines reported
    assert "service: bentoml serve, 2 workers" in text and "baseline 2p: 2 processes" in text
    assert "| 64 | 3,000 | 1,000 | 2,000 | 1.50 |" in text
    assert res["command"].startswith("python -m bench.serving --rounds 3 --duration 10")


@pytest.mark.slow
def test_a_tiny_run_measures_the_service_and_both_baselines(lenet_version, tmp_path, monkeypatch):
    root, name, version, _ = lenet_version
    monkeypatch.setenv("WORKERS", "2")
    res = serving_main(["--rounds", "1", "--duration", "1", "--warmup", "0", "--connections", "1", "8",
                        "--evaluate-requests", "1", "--artifacts-dir", str(root), "--model-name", name,
                        "--model-version", version, "--results-dir", str(tmp_path)])
    assert {t: s["workers"] for t, s in res["sides"].items()} == {"service": 2, "baseline_1p": 1, "baseline_2p": 2}
    assert [r["connections"] for r in res["rows"]] == [1, 8]
    for row in res["rows"]:
        assert row["baseline"] in ("baseline_1p", "baseline_2p")
        for t in res["sides"]:
            assert row[f"{t}_requests_per_s"] > 0 and row[f"{t}_non_2xx"] == 0
    assert res["evaluate"]["service_images_per_s"] > 0
    assert len(list(tmp_path.glob("serving-*.json"))) == 1 and len(list(tmp_path.glob("serving-*.png"))) == 1


def test_a_server_whose_port_was_taken_meanwhile_starts_on_another(monkeypatch):
    """Servers start side by side: a port free a moment ago can be taken before the server binds it (CI once
    saw `bentoml serve` exit with EADDRINUSE). The harness starts it again on another port."""
    import socket

    import httpx

    from bench import harness

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    ports = iter([taken.getsockname()[1]])
    real_free_port = harness.free_port
    monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or real_free_port())
    serve = ("import sys, http.server; port = int(sys.argv[sys.argv.index('--port') + 1]); "
             "http.server.HTTPServer(('127.0.0.1', port), http.server.SimpleHTTPRequestHandler).serve_forever()")
    server = harness.Server({}, cmd=[sys.executable, "-c", serve], workers=None,
                            probe=lambda url: httpx.get(url, timeout=2).status_code == 200, ready_timeout=20)
    with taken, server as s:
        assert s.port != taken.getsockname()[1]
        assert httpx.get(s.url, timeout=2).status_code == 200
