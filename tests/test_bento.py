"""The Bento: built by `make bento`'s code, it carries its weights and serves by its tag from elsewhere."""

from __future__ import annotations

import io
import json
import os
import shutil
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
from tests.conftest import ROOT, StartAhead

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
    path = Path(_bentoml("get", tag, "-o", "path", env=env).stdout.strip())
    return tag, path, env, version


@pytest.fixture(scope="module")
def bento_servers(bento, tmp_path_factory):
    """`bentoml serve TAG` twice, started side by side (start-up is the slow part), each from a folder without
    the project: "flipped" on a copy of the model store with one byte of the weights flipped (never ready:
    up when /livez answers), "elsewhere" with ARTIFACTS_DIR, MODEL_NAME and MODEL_VERSION pointing at nothing."""
    tag, _, env, version = bento
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    flipped = tmp_path_factory.mktemp("flipped")
    home = flipped / "home"
    shutil.copytree(env["BENTOML_HOME"], home, symlinks=True)  # damage a copy, not the module's store
    flipped_env = {**env, "BENTOML_HOME": str(home), "PYTHONPATH": ""}
    weights = _stored_version(flipped_env, "lenet", version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    elsewhere_env = {**env, "ARTIFACTS_DIR": str(elsewhere / "no-artifacts-here"), "MODEL_NAME": "cnn",
                     "MODEL_VERSION": "", "PYTHONPATH": ""}
    live = lambda url: httpx.get(url + "/livez", timeout=2).status_code == 200  # noqa: E731
    serve = [bentoml, "serve", tag]
    with StartAhead({"flipped": lambda: Server(flipped_env, cmd=serve, cwd=flipped, probe=live),
                     "elsewhere": lambda: Server(elsewhere_env, cmd=serve, cwd=elsewhere)}) as servers:
        yield servers


def _bentoml(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("bentoml")), *args], env=env, capture_output=True,
                          text=True, check=True)


def _stored_version(env: dict, name: str, version: str) -> Path:
    """The version's folder inside BentoML's model store (where the Bento's service reads it)."""
    return Path(env["BENTOML_HOME"]) / "models" / f"imgclf-{name}" / version / "artifact" / name / version


def test_make_bento_imports_the_version_into_bentomls_model_store(bento, lenet_version, tmp_path):
    import yaml

    tag, path, env, version = bento
    root, name, _, manifest = lenet_version
    listed = _bentoml("models", "list", "-o", "json", env=env).stdout
    assert f"imgclf-{name}:{version}" in listed
    info = json.loads(_bentoml("models", "get", f"imgclf-{name}:{version}", "-o", "json", env=env).stdout)
    assert info["metadata"]["weights_sha256"] == manifest["weights_sha256"]
    assert info["metadata"]["test_accuracy"] == manifest["test_accuracy"]
    assert info["labels"]["model"] == name
    # the stored copy is the whole version, verified by the same code as under artifacts/
    artifacts.verify(_stored_version(env, name, version))
    # the Bento references the model by tag instead of carrying a staged copy of the files in its source
    bento_yaml = yaml.safe_load((path / "bento.yaml").read_text())
    assert [m["tag"] for m in bento_yaml["models"]] == [f"imgclf-{name}:{version}"]
    assert not list(path.glob("src/**/*.safetensors"))
    exported = tmp_path / "model.bentomodel"
    _bentoml("models", "export", f"imgclf-{name}:{version}", str(exported), env=env)
    assert exported.stat().st_size > (root / name / version / "model.safetensors").stat().st_size


def test_a_flipped_byte_in_the_model_stores_copy_is_refused_before_serving(bento_servers):
    with bento_servers.take("flipped") as server:
        r = httpx.get(server.url + "/readyz", timeout=10)
        assert r.status_code == 503 and "model.safetensors" in r.text, r.text
        assert httpx.post(server.url + "/predict", json={"images": [[[0] * 28] * 28]}, timeout=10).status_code == 503


def test_bento_holds_dockerfile_and_only_what_it_needs(bento):
    tag, path, _, version = bento
    assert (path / "env" / "docker" / "Dockerfile").is_file()
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert "python:3.11" in dockerfile
    assert not list(path.glob("src/training/**/*.py")), "training code does not ship"
    assert not list(path.glob("src/tests/**")), "tests do not ship"
    reqs = (path / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in reqs and "bentoml==1.4.40" in reqs  # the project's pins


def test_bento_serves_its_own_version_from_another_folder(bento, bento_servers, fashion):
    tag, path, env, version = bento
    with bento_servers.take("elsewhere") as server:
        x, y = fashion.test_x[:500], fashion.test_y[:500]
        buf = io.BytesIO()
        np.savez(buf, images=x[:, 0].numpy(), labels=y.numpy())
        r = httpx.post(server.url + "/evaluate_npz", files={"file": ("t.npz", buf.getvalue())}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["model_version"] == version
        loaded = artifacts.load(_stored_version(env, "lenet", version).parent.parent, "lenet", version)
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
