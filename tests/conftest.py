"""Shared fixtures. Tests run on the packaged Fashion-MNIST (CI installs it) or small data made here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.config import make_config  # noqa: E402

# Keep 2-core machines responsive when several test processes or servers share them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_config(tmp_path: Path, **overrides):
    """A run of seconds: few images, one epoch, artifacts under tmp_path."""
    base = dict(model="lenet", limit_train=1024, limit_test=512, epochs=1, batch_size=128,
                artifacts_dir=str(tmp_path / "artifacts"))
    base.update(overrides)
    return make_config(**base)


def tiny_manifest(test_accuracy: float = 0.5):
    """A complete manifest of a 3-class MLP on 1x4x4 inputs (publish fills in name, version, hash, files)."""
    from core.manifest import Calibration, DatasetRecord, InputSpec, Manifest, ModelSpec, OfflineMetrics, TrainingRecord

    return Manifest(
        name="", version="", created_at="2026-01-01T00:00:00+00:00",
        model=ModelSpec("mlp", {"hidden": [8]}), classes=("a", "b", "c"),
        input=InputSpec(channels=1, height=4, width=4, mean=(0.5,), std=(0.25,)),
        dataset=DatasetRecord("tiny", "made here", 8, 0, 4, False),
        metrics=OfflineMetrics(test_accuracy, 1.0, [[1, 1, 0], [0, 1, 0], [0, 0, 1]], [], Calibration(0.0, 15, [])),
        training=TrainingRecord({}, 0, {}, None, "cpu", 0.0, False, 0, [], {}))


@pytest.fixture(scope="session")
def lenet_version(tmp_path_factory):
    """A real LeNet trained 2 epochs on full Fashion-MNIST, evaluated on all 10,000 test images.

    Returns (artifacts_dir, name, version, manifest). Shared by the service and deployment tests.
    """
    from training.pipeline import train

    root = tmp_path_factory.mktemp("lenet-artifacts")
    cfg = make_config(model="lenet", epochs=2, artifacts_dir=str(root))
    folder = train(cfg, log=lambda *_: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    return root, "lenet", folder.name, manifest


class Server:
    """A real `bentoml serve` process of the service on a free localhost port."""

    def __init__(self, env: dict, workers: int = 1, log_path: Path | None = None, cmd: list[str] | None = None,
                 cwd: Path | None = None):
        import socket
        import subprocess
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="imgclf-server-", suffix=".log")[1])
        # each server its own BENTOML_HOME: `bentoml serve` empties the Prometheus multiprocess
        # folder there at start, which would wipe another running server's metrics
        home = env.get("BENTOML_HOME") or tempfile.mkdtemp(prefix="bentoml-home-")
        full_env = {**os.environ, "WORKERS": str(workers), "DEVICE": "cpu", "BENTOML_DO_NOT_TRACK": "true", **env,
                    "BENTOML_HOME": home}
        cmd = cmd or [sys.executable, "-m", "service.cli", "serve"]
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port), "--host", "127.0.0.1"], cwd=cwd or ROOT, env=full_env,
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log()[-3000:]}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"not ready after {timeout} s:\n{self.log()[-3000:]}")

    def __enter__(self) -> "Server":
        """`with Server(env) as s:` - ready inside the block, stopped after it (also when start-up fails)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def lenet_env(lenet_version) -> dict:
    root, name, version, _ = lenet_version
    return {"ARTIFACTS_DIR": str(root), "MODEL_NAME": name, "MODEL_VERSION": version}


@pytest.fixture(scope="session")
def lenet_server(lenet_version):
    """One real server of the LeNet version for the HTTP contract tests (1 worker)."""
    with Server(lenet_env(lenet_version)) as server:
        yield server


@pytest.fixture(scope="session")
def fashion():
    from training.data import load_dataset

    return load_dataset("fashion_mnist")
