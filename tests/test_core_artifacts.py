"""core/artifacts.py: versions are written atomically, never overwritten, and verified before use."""

from __future__ import annotations

import json
import os
import pickle
import time

import pytest
import torch

from core import artifacts
from core.artifacts import ArtifactError, ArtifactNotFound, IntegrityError, InvalidName
from core.models import build_model
from tests.conftest import tiny_manifest

CLASSES = ["a", "b", "c"]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("mlp", 1, 4, 4, 3, hidden=[8])


def _publish(root, seed: int = 0, name: str = "tiny", **kw):
    return artifacts.publish(root, name, _model(seed).state_dict(), tiny_manifest(), **kw)


def _visible(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_publish_then_load_verifies_and_rebuilds_the_same_model(tmp_path):
    folder = _publish(tmp_path, write_extras=lambda d, m: (d / "report.md").write_text(f"# {m.version}\n"))
    m = artifacts.verify(folder).to_dict()
    assert m["version"] == folder.name and m["name"] == "tiny"
    assert m["weights_sha256"] == artifacts.sha256_file(folder / "model.safetensors")
    assert set(m["files"]) == {"model.safetensors", "report.md"}
    loaded = artifacts.load(tmp_path, "tiny")
    assert loaded.version == folder.name
    x = torch.rand(5, 1, 4, 4)
    ref = _model(0).eval()
    assert torch.equal(loaded.model(x), ref(x))


def test_a_flipped_byte_is_an_integrity_error_naming_the_file(tmp_path):
    folder = _publish(tmp_path)
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        artifacts.load(tmp_path, "tiny")


def test_a_changed_extra_file_is_an_integrity_error_naming_it(tmp_path):
    folder = _publish(tmp_path, write_extras=lambda d, m: (d / "report.md").write_text("ok\n"))
    (folder / "report.md").write_text("tampered\n")
    with pytest.raises(IntegrityError, match="report.md"):
        artifacts.verify(folder)


def test_extra_and_missing_files_are_refused(tmp_path):
    folder = _publish(tmp_path)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="extra.bin"):
        artifacts.load(tmp_path, "tiny")
    (folder / "extra.bin").unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="model.safetensors"):
        artifacts.load(tmp_path, "tiny")


class _Evil:
    """Unpickling this creates the marker file: the proof that pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    assert not marker.exists()
    folder = _publish(tmp_path / "art")
    (folder / "model.safetensors").write_bytes(payload)
    # 1) the manifest's hash no longer matches
    with pytest.raises(IntegrityError, match="model.safetensors"):
        artifacts.load(tmp_path / "art", "tiny")
    # 2) an attacker who also rewrites the hashes: the file is still read as safetensors, never unpickled
    m = json.loads((folder / "manifest.json").read_text())
    sha = artifacts.sha256_file(folder / "model.safetensors")
    m["weights_sha256"] = m["files"]["model.safetensors"] = sha
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        artifacts.load(tmp_path / "art", "tiny")
    assert not marker.exists(), "the pickle was executed"


@pytest.mark.parametrize("bad", ["a/b", "..", "../x", "a..b", "/abs", ".hidden", "", "x" * 200, "a b"])
def test_names_that_could_leave_the_folder_are_refused(tmp_path, bad):
    with pytest.raises(InvalidName, match="invalid"):
        artifacts.publish(tmp_path, bad, _model().state_dict(), tiny_manifest())
    with pytest.raises(InvalidName):
        artifacts.resolve(tmp_path, bad)
    _publish(tmp_path)
    with pytest.raises(InvalidName):
        artifacts.resolve(tmp_path, "tiny", bad)
    with pytest.raises(InvalidName):
        artifacts.promote(tmp_path, "tiny", bad)
    assert not (tmp_path.parent / "x").exists()


def test_versions_are_never_overwritten(tmp_path, monkeypatch):
    fixed = time.gmtime(1_700_000_000)
    monkeypatch.setattr(artifacts.time, "gmtime", lambda *a: fixed)
    first = _publish(tmp_path, seed=0)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(ArtifactError, match="never overwritten"):
        _publish(tmp_path, seed=0)  # same second, same weights: the same version id
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert _visible(tmp_path / "tiny") == [first.name]
    artifacts.verify(first)


def test_promote_and_resolve_promoted_else_newest(tmp_path, monkeypatch):
    with pytest.raises(ArtifactNotFound, match="make train"):
        artifacts.resolve(tmp_path, "tiny")
    t = iter([time.gmtime(1_700_000_000), time.gmtime(1_700_000_100)])
    monkeypatch.setattr(artifacts.time, "gmtime", lambda *a: next(t))
    old = _publish(tmp_path, seed=0)
    new = _publish(tmp_path, seed=1)
    assert artifacts.list_versions(tmp_path, "tiny") == [old.name, new.name]
    assert artifacts.list_names(tmp_path) == ["tiny"]
    assert artifacts.resolve(tmp_path, "tiny") == new  # newest
    artifacts.promote(tmp_path, "tiny", old.name)
    assert artifacts.promoted(tmp_path, "tiny") == old.name
    assert artifacts.resolve(tmp_path, "tiny") == old  # promoted wins
    assert artifacts.load(tmp_path, "tiny").version == old.name
    assert artifacts.resolve(tmp_path, "tiny", new.name) == new  # an explicit version wins
    with pytest.raises(ArtifactNotFound, match=old.name):
        artifacts.promote(tmp_path, "tiny", "20990101-000000-deadbeef")
    with pytest.raises(ArtifactNotFound, match="known"):
        artifacts.resolve(tmp_path, "tiny", "20990101-000000-deadbeef")
    # the PROMOTED marker is not a version
    assert artifacts.list_versions(tmp_path, "tiny") == [old.name, new.name]


@pytest.mark.parametrize("exc", [RuntimeError("boom in write_extras"), KeyboardInterrupt()])
def test_a_crash_inside_publish_leaves_no_version_and_no_temp_folder(tmp_path, exc):
    def crash(folder, manifest):
        (folder / "half.png").write_bytes(b"\x89PNG half")
        raise exc

    with pytest.raises(type(exc)):
        _publish(tmp_path, write_extras=crash)
    assert artifacts.list_versions(tmp_path, "tiny") == []
    assert _visible(tmp_path / "tiny") == []  # no version, no .tmp-* folder
    with pytest.raises(ArtifactNotFound):
        artifacts.resolve(tmp_path, "tiny")


def test_temporary_folders_of_dead_publishers_are_hidden_and_swept(tmp_path):
    parent = tmp_path / "tiny"
    parent.mkdir()
    dead = parent / ".tmp-999999999-abc"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    mine = parent / f".tmp-{os.getpid()}-live"  # a live publisher's folder is left alone
    mine.mkdir()
    assert artifacts.list_versions(tmp_path, "tiny") == []
    folder = _publish(tmp_path)
    assert not dead.exists() and mine.exists()
    assert artifacts.list_versions(tmp_path, "tiny") == [folder.name]


def test_weights_that_do_not_fit_the_manifest_architecture_are_an_artifact_error(tmp_path):
    folder = _publish(tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    m["model"]["kwargs"] = {"hidden": [16]}
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="does not fit"):
        artifacts.load(tmp_path, "tiny")
