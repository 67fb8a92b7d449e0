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

from bench.harness import Server, wait_stopped  # noqa: E402
from training.config import make_config  # noqa: E402

# Keep 2-core machines responsive when several test processes or servers share them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def servers_stop_in_background():
    """A server's block ends as soon as it is told to stop; its graceful shutdown (seconds, mostly waiting)
    runs beside the next test, and the session waits for every one at its end."""
    Server.stop_in_background = True
    yield
    wait_stopped()
    Server.stop_in_background = False


class StartAhead:
    """Servers for a module's tests, each started while the test before it runs: a start-up costs seconds of
    one core (BentoML imports the service in two processes, one after the other), so two start side by side
    on a 2-core machine in about the time of one. `take(key)` returns the server of `key` (starting it if it
    is not yet) and starts the next `ahead` ones in `starts`' order; the test stops its server itself
    (`close()`), the rest are stopped after the block. The keys follow the order in which the tests run."""

    def __init__(self, starts: dict, ahead: int = 1):
        self._starts, self._servers, self._ahead = starts, {}, ahead

    def _start(self, key) -> Server:
        if key not in self._servers:
            self._servers[key] = self._starts[key]()
        return self._servers[key]

    def take(self, key) -> Server:
        server = self._start(key)
        keys = list(self._starts)
        for later in keys[keys.index(key) + 1:keys.index(key) + 1 + self._ahead]:
            self._start(later)
        return server

    def __enter__(self) -> StartAhead:
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers.values():
            server.close()


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


def lenet_env(lenet_version) -> dict:
    root, name, version, _ = lenet_version
    return {"ARTIFACTS_DIR": str(root), "MODEL_NAME": name, "MODEL_VERSION": version}


@pytest.fixture(scope="session")
def rollout_registry(lenet_version, tmp_path_factory):
    """A registry of two real LeNet versions, both evaluated on all 10,000 test images (so both carry
    stored test predictions and compare): the champion is the session LeNet, the challenger a weaker one
    (1 epoch on 6,000 images, seed 1). Returns (root, name, champion, challenger). Read-only for tests:
    a test that moves an alias copies the folder first."""
    import shutil

    from core import registry
    from training.pipeline import train

    src_root, name, champion, _ = lenet_version
    root = tmp_path_factory.mktemp("rollout-artifacts")
    shutil.copytree(Path(src_root) / name / champion, root / name / champion)
    cfg = make_config(model="lenet", epochs=1, limit_train=6000, seed=1, artifacts_dir=str(root))
    challenger = train(cfg, log=lambda *_: None).name
    registry.promote(root, name, champion)
    registry.promote(root, name, challenger, alias=registry.CHALLENGER)
    return root, name, champion, challenger


@pytest.fixture(scope="session")
def lenet_server(lenet_version):
    """One real server of the LeNet version for the HTTP contract tests (1 worker)."""
    with Server(lenet_env(lenet_version)) as server:
        yield server


@pytest.fixture(scope="session")
def fashion():
    from training.data import load_dataset

    return load_dataset("fashion_mnist")
