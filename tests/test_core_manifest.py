"""core/manifest.py: the typed manifest reads what training writes, and refuses what it cannot read."""

from __future__ import annotations

import json

import pytest

from core import artifacts
from core.artifacts import IntegrityError
from core.manifest import Manifest, ManifestError
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from training.pipeline import train

    tmp = tmp_path_factory.mktemp("manifest")
    folder = train(tiny_config(tmp), log=lambda *_: None)
    return tmp / "artifacts", folder


def test_a_written_manifest_round_trips_through_the_dataclasses(published):
    _, folder = published
    raw = json.loads((folder / "manifest.json").read_text())
    m = Manifest.from_dict(raw)
    assert m.to_dict() == raw  # the typed form loses nothing and adds nothing
    assert m.version == folder.name and m.model.arch == "lenet" and m.input.shape == (1, 28, 28)
    cm = raw["confusion_matrix"]
    assert m.metrics.n == sum(map(sum, cm)) == raw["dataset"]["test"]
    assert m.metrics.correct == sum(cm[i][i] for i in range(len(cm)))
    assert m.metrics.test_accuracy == m.metrics.correct / m.metrics.n


def _rewrite(folder, **changes):
    raw = json.loads((folder / "manifest.json").read_text())
    raw.update(changes)
    (folder / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("schema", [99, 0, "1", None])
def test_an_unknown_schema_version_is_refused_by_name(published, schema):
    _, folder = published
    raw = json.loads((folder / "manifest.json").read_text())
    with pytest.raises(ManifestError, match=f"schema_version {schema!r}"):
        Manifest.from_dict({**raw, "schema_version": schema})


def test_loading_a_version_whose_manifest_says_schema_99_is_refused(published, tmp_path):
    import shutil

    root, folder = published
    copy = tmp_path / "lenet" / folder.name
    shutil.copytree(folder, copy)
    _rewrite(copy, schema_version=99)
    with pytest.raises(IntegrityError, match="schema_version 99"):
        artifacts.load(tmp_path, "lenet", folder.name)


def test_unknown_and_missing_keys_are_named(published):
    _, folder = published
    raw = json.loads((folder / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="unknown key.*surprise"):
        Manifest.from_dict({**raw, "surprise": 1})
    with pytest.raises(ManifestError, match="'input' has unknown key.*colour"):
        Manifest.from_dict({**raw, "input": {**raw["input"], "colour": True}})
    without = {k: v for k, v in raw.items() if k != "classes"}
    with pytest.raises(ManifestError, match="'classes'"):
        Manifest.from_dict(without)
    with pytest.raises(ManifestError, match="'model' lacks arch"):
        Manifest.from_dict({**raw, "model": {}})
    with pytest.raises(ManifestError, match="JSON object"):
        Manifest.from_dict([raw])


def test_test_predictions_is_named_and_older_manifests_without_it_still_read(published):
    _, folder = published
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["test_predictions"] == "test_predictions.safetensors" and raw["test_predictions"] in raw["files"]
    older = {k: v for k, v in raw.items() if k != "test_predictions"}  # published before the file existed
    m = Manifest.from_dict(older)
    assert m.test_predictions is None and m.to_dict() == older
    with pytest.raises(ManifestError, match="'test_predictions' must be a file name or null"):
        Manifest.from_dict({**raw, "test_predictions": 3})


def test_a_manifest_naming_unhashed_test_predictions_is_refused(published, tmp_path):
    import shutil

    root, folder = published
    copy = tmp_path / "lenet" / folder.name
    shutil.copytree(folder, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["files"]["test_predictions.safetensors"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="names test_predictions .* but lists no hash"):
        artifacts.verify(copy)
