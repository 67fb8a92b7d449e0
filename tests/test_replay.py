"""training/replay.py through the CLI: `train --from-version NAME/VERSION` reproduces the weights on the
CPU, and refuses, before any training, data files whose sha256 differs from the manifest's record."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from core import artifacts
from training.__main__ import main
from training.data import DEBIAN_FASHION_MNIST

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")
TINY = ["--model", "mlp", "--limit-train", "1024", "--limit-test", "256", "--epochs", "2", "--optimizer", "adam",
        "--lr", "0.003", "--augment"]


def _published(out: str) -> Path:
    return Path(re.search(r"^published (.+)$", out, re.M).group(1))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny version trained on the packaged data, and its artifacts folder."""
    art = tmp_path_factory.mktemp("replay") / "art"
    assert main(["train", *TINY, "--artifacts-dir", str(art)]) == 0
    versions = artifacts.list_versions(art, "mlp")
    assert len(versions) == 1
    return art, artifacts.verify(art / "mlp" / versions[0])


def test_the_manifest_records_the_sha256_of_the_four_data_files(original):
    _, m = original
    assert sorted(m.dataset.files) == sorted(FILES)
    for name, sha in m.dataset.files.items():
        assert sha == artifacts.sha256_file(Path(m.dataset.source) / name)


def test_a_replay_publishes_a_new_version_with_the_same_weights(original, tmp_path, capsys):
    art, m = original
    dst = tmp_path / "art"
    (dst / "mlp").mkdir(parents=True)
    (dst / "mlp" / m.version).symlink_to(art / "mlp" / m.version)  # the source version, read in place
    capsys.readouterr()
    assert main(["train", "--from-version", f"mlp/{m.version}", "--artifacts-dir", str(dst)]) == 0
    out = capsys.readouterr().out
    new = artifacts.verify(_published(out))
    assert new.version != m.version and new.training.replay_of == f"mlp/{m.version}"
    assert new.weights_sha256 == m.weights_sha256
    assert new.metrics.confusion_matrix == m.metrics.confusion_matrix
    assert new.metrics.calibration.temperature == m.metrics.calibration.temperature
    assert new.dataset.files == m.dataset.files
    assert {k: v for k, v in new.training.config.items() if k != "artifacts_dir"} == \
        {k: v for k, v in m.training.config.items() if k != "artifacts_dir"}
    assert f"replay of mlp/{m.version}: weights_sha256 {m.weights_sha256[:16]}... identical" in out
    assert json.loads((_published(out) / "manifest.json").read_text())["replay_of"] == f"mlp/{m.version}"


@pytest.fixture
def changed_copy(tmp_path):
    """The four files, with one label of the test set changed (still a valid idx file)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in FILES[:3]:
        (data / name).symlink_to(Path(DEBIAN_FASHION_MNIST) / name)
    raw = bytearray(gzip.decompress((Path(DEBIAN_FASHION_MNIST) / FILES[3]).read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # the first label (after the 8-byte header)
    (data / FILES[3]).write_bytes(gzip.compress(bytes(raw)))
    return data


@pytest.mark.parametrize("how", ["--data-dir", "DATA_DIR"])
def test_a_replay_refuses_a_changed_data_file_by_name_before_training(original, changed_copy, how, capsys,
                                                                       monkeypatch):
    art, m = original
    args = ["train", "--from-version", f"mlp/{m.version}", "--artifacts-dir", str(art)]
    if how == "DATA_DIR":
        monkeypatch.setenv("DATA_DIR", str(changed_copy))
    else:
        args += ["--data-dir", str(changed_copy)]
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing trained, nothing logged
    line, = err.splitlines()
    assert line.startswith(f"error: data file {changed_copy / FILES[3]} differs from the one mlp/{m.version} was "
                           "trained on"), line
    assert artifacts.list_versions(art, "mlp") == [m.version]
    assert not (art / ".checkpoints").exists() or not any((art / ".checkpoints").iterdir())


def test_a_replay_takes_no_setting_that_changes_what_it_computes(original, capsys):
    art, m = original
    assert main(["train", "--from-version", f"mlp/{m.version}", "--epochs", "3", "--artifacts-dir", str(art)]) == 2
    assert "only --artifacts-dir and --data-dir may be given with it, not --epochs" in capsys.readouterr().err
    assert main(["train", "--from-version", "mlp", "--artifacts-dir", str(art)]) == 2
    assert "NAME/VERSION" in capsys.readouterr().err


def test_a_version_without_data_hashes_cannot_be_replayed(original, tmp_path, capsys):
    import shutil

    art, m = original
    copy = tmp_path / "mlp" / m.version
    shutil.copytree(art / "mlp" / m.version, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["dataset"]["files"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert main(["train", "--from-version", f"mlp/{m.version}", "--artifacts-dir", str(tmp_path)]) == 2
    assert "records no sha256 of its data files" in capsys.readouterr().err
