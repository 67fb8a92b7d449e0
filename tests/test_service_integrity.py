"""A version that is not exactly what training wrote is never served: a flipped byte in the weights,
a missing file, a MODEL_VERSION that reaches outside ARTIFACTS_DIR. The server stays up (/livez 200),
/readyz and the endpoints answer 503 with the reason, and the log says why."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from bench.harness import Server
from tests.conftest import StartAhead

pytestmark = pytest.mark.slow

IMG = [[0] * 28 for _ in range(28)]


def refused(s: Server, needle: str, timeout: float = 60) -> tuple[Server, httpx.Response]:
    """Wait until the server of a bad version answers /readyz with `needle` in its reason (at most `timeout` s:
    the caller's assertions then say what it answered)."""
    deadline, r = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert s.proc.poll() is None, s.log()[-3000:]
        try:
            r = httpx.get(s.url + "/readyz", timeout=5)
            if needle in r.text:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return s, r


def copy_version(lenet_version, tmp_path_factory):
    root, name, version, _ = lenet_version
    bad_root = tmp_path_factory.mktemp("tampered")
    shutil.copytree(root / name / version, bad_root / name / version)
    return bad_root, bad_root / name / version


def assert_never_served(s: Server, r: httpx.Response | None, *phrases: str) -> None:
    assert r is not None and r.status_code == 503, r and r.text
    error = r.json()["error"]
    assert error.startswith("not ready: ") and all(p in error for p in phrases), error
    for route, kw in (("/predict", {"json": {"images": [IMG]}}),
                      ("/evaluate", {"json": {"images": [IMG], "labels": [0]}}),
                      ("/model_info", {})):
        p = httpx.post(s.url + route, timeout=30, **kw)
        assert p.status_code == 503 and all(ph in p.json()["error"] for ph in phrases), (route, p.text)
    assert httpx.get(s.url + "/livez", timeout=5).status_code == 200  # up, only not ready
    time.sleep(3)
    assert httpx.get(s.url + "/readyz", timeout=5).status_code == 503  # still refused, never ready
    log = s.log()
    assert "NOT READY" in log and all(p in log for p in phrases), log[-3000:]


TRAVERSALS = ["../x", "../../etc", "/etc"]
CANNOT_LOAD = [({"MODEL_VERSION": "20000101-000000-00000000"}, "no version"),  # unknown version
               ({"DEVICE": "cuda"}, "CUDA")]                                    # asked for a GPU that is not there


@pytest.fixture(scope="module")
def bad(lenet_version, tmp_path_factory):
    """The module's bad versions, and a server of each started while the tests before its own run
    (conftest.StartAhead). Keys: "flipped", "missing", each traversal, each CANNOT_LOAD's words."""
    root, name, version, _ = lenet_version
    flipped_root, folder = copy_version(lenet_version, tmp_path_factory)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    missing_root, folder = copy_version(lenet_version, tmp_path_factory)
    (folder / "model.safetensors").unlink()
    env = {"ARTIFACTS_DIR": str(root), "MODEL_NAME": name, "MODEL_VERSION": version}
    envs = {"flipped": {**env, "ARTIFACTS_DIR": str(flipped_root)},
            "missing": {**env, "ARTIFACTS_DIR": str(missing_root)},
            **{v: {**env, "MODEL_VERSION": v} for v in TRAVERSALS},
            **{words: {**env, **extra} for extra, words in CANNOT_LOAD}}
    # two ahead: the tests take seconds and a start-up about 10 s of one core, so two start-ups keep 2 cores busy
    with StartAhead({key: (lambda e=e: Server(e)) for key, e in envs.items()}, ahead=2) as servers:
        yield {"servers": servers, "flipped": (flipped_root, weights)}


def test_flipped_byte_in_the_weights_never_becomes_ready(lenet_version, bad):
    _, name, version, manifest = lenet_version
    bad_root, weights = bad["flipped"]
    import hashlib

    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert actual != manifest["weights_sha256"]
    s, r = refused(bad["servers"].take("flipped"), "sha256")
    try:
        # clients see the file relative to ARTIFACTS_DIR, never the server's absolute path; the log has it
        assert_never_served(s, r, f"{name}/{version}/model.safetensors", manifest["weights_sha256"], actual)
        assert str(weights) in s.log() and str(bad_root) not in r.text
    finally:
        s.close()


def test_missing_weights_file_never_becomes_ready(lenet_version, bad):
    _, name, version, _ = lenet_version
    s, r = refused(bad["servers"].take("missing"), "model.safetensors")
    try:
        assert_never_served(s, r, "model.safetensors", version)
    finally:
        s.close()


@pytest.mark.parametrize("version", TRAVERSALS)
def test_path_traversal_in_model_version_is_refused(bad, version):
    s, r = refused(bad["servers"].take(version), "invalid version")
    try:
        assert_never_served(s, r, "invalid version", repr(version))
    finally:
        s.close()


@pytest.mark.parametrize("env, words", CANNOT_LOAD)
def test_a_version_that_cannot_load_answers_503_with_the_reason(bad, env, words):
    import torch

    if env.get("DEVICE") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: DEVICE=cuda loads")
    s, r = refused(bad["servers"].take(words), words)
    try:
        assert_never_served(s, r, words)
    finally:
        s.close()
