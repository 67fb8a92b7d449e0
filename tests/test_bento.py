"""The Bento: built by `make bento`'s code, it carries its weights and serves by its tag from elsewhere."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bench.harness import Server
from core import artifacts
from core.models import forward_logits, preprocess
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bento(lenet_version, tmp_path_factory):
    root, name, version, _ = lenet_version
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "ARTIFACTS_DIR": str(root), "MODEL_NAME": name,
           "MODEL_VERSION": version, "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "deploy.bento", "build"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    tag = out.stdout.strip().splitlines()[-1].split()[2]
    path = Path(subprocess.run([str(Path(sys.executable).with_name("bentoml")), "get", tag, "-o", "path"], env=env,
                               capture_output=True, text=True, check=True).stdout.strip())
    assert not (ROOT / "bundle").exists(), "the staging folder must not stay behind in the checkout"
    return tag, path, env, version


def test_bento_holds_weights_dockerfile_and_only_what_it_needs(bento):
    tag, path, _, version = bento
    weights = list(path.glob("src/bundle/artifacts/lenet/*/model.safetensors"))
    assert [w.parent.name for w in weights] == [version]
    assert (path / "env" / "docker" / "Dockerfile").is_file()
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert "python:3.11" in dockerfile
    assert not list(path.glob("src/training/**/*.py")), "training code does not ship"
    assert not list(path.glob("src/tests/**")), "tests do not ship"
    reqs = (path / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in reqs and "bentoml==1.4.40" in reqs  # the project's pins


def test_bento_serves_its_own_version_from_another_folder(bento, fashion, tmp_path):
    tag, path, env, version = bento
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server_env = {**env, "ARTIFACTS_DIR": str(elsewhere / "no-artifacts-here"), "MODEL_NAME": "cnn",
                  "MODEL_VERSION": "", "PYTHONPATH": ""}
    with Server(server_env, cmd=[str(Path(sys.executable).with_name("bentoml")), "serve", tag],
                cwd=elsewhere) as server:
        x, y = fashion.test_x[:500], fashion.test_y[:500]
        buf = io.BytesIO()
        np.savez(buf, images=x[:, 0].numpy(), labels=y.numpy())
        r = httpx.post(server.url + "/evaluate_npz", files={"file": ("t.npz", buf.getvalue())}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["model_version"] == version
        loaded = artifacts.load(path / "src" / "bundle" / "artifacts", "lenet", version)
        with torch.inference_mode():
            pred = forward_logits(loaded.model, preprocess(x, loaded.manifest.input)).argmax(1)
        assert got["n"] == 500
        assert got["accuracy"] == int((pred == y).sum()) / 500


def test_containerize_says_plainly_when_no_engine_answers(bento):
    from deploy.bento import engine

    if engine() is not None:
        pytest.skip("a container engine answers here: containerize would really build an image")
    tag, _, env, _ = bento
    out = subprocess.run([sys.executable, "-m", "deploy.bento", "containerize", tag], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "no container engine answers" in out.stderr and "env/docker/Dockerfile" in out.stderr
