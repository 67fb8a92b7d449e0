"""core/registry.py and its CLI: aliases, the champion gate, rollback, the append-only log, paired comparison.

Two real LeNets, trained once per module (1 epoch on 256 and on 2048 training images, each evaluated
on all 10,000 official test images, as a comparison requires): the weak one is significantly worse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import artifacts, registry
from core.artifacts import IntegrityError
from tests.conftest import tiny_config
from training.__main__ import _official_test_set, main

OLD = "20000101-000000-oldformat"  # sorts first, like a version published long ago


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.pipeline import train

    tmp = tmp_path_factory.mktemp("registry")
    weak = train(tiny_config(tmp, limit_train=256, limit_test=None), log=lambda *_: None)
    strong = train(tiny_config(tmp, limit_train=2048, limit_test=None), log=lambda *_: None)
    return tmp / "artifacts", weak.name, strong.name


@pytest.fixture
def reg(trained, tmp_path):
    """A private copy of the two versions (each test changes aliases and the log): (root, weak, strong)."""
    root, weak, strong = trained
    shutil.copytree(root / "lenet", tmp_path / "lenet")
    return tmp_path, weak, strong


@pytest.fixture
def cli(reg, capsys):
    """cli("promote", "lenet", v) -> (exit code, stdout, stderr) of `python -m training` on reg's folder."""
    def run(command: str, *args: str) -> tuple[int, str, str]:
        code = main([command, "--artifacts-dir", str(reg[0]), *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def _old_format_copy(root: Path, version: str) -> str:
    """The version as published before test predictions were stored: no file, no manifest key."""
    dst = root / "lenet" / OLD
    shutil.copytree(root / "lenet" / version, dst)
    (dst / registry.TEST_PREDICTIONS).unlink()
    raw = json.loads((dst / "manifest.json").read_text())
    del raw["test_predictions"], raw["files"][registry.TEST_PREDICTIONS]
    raw["version"] = OLD
    (dst / "manifest.json").write_text(json.dumps(raw))
    artifacts.verify(dst)
    return OLD


def _rewrite_dataset(root: Path, version: str, new_id: str, **changes) -> str:
    dst = root / "lenet" / new_id
    shutil.copytree(root / "lenet" / version, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    raw["dataset"].update(changes)
    raw["version"] = new_id
    (dst / "manifest.json").write_text(json.dumps(raw))
    return new_id


# --- stored predictions ---------------------------------------------------------------------

def test_every_version_stores_its_hashed_per_image_test_predictions(reg):
    root, weak, _ = reg
    folder = root / "lenet" / weak
    m = artifacts.verify(folder)
    assert m.test_predictions == registry.TEST_PREDICTIONS and registry.TEST_PREDICTIONS in m.files
    t = load_file(folder / registry.TEST_PREDICTIONS)
    assert t["predictions"].dtype == t["labels"].dtype == torch.int64
    assert t["predictions"].shape == t["labels"].shape == (10000,) == (m.dataset.test,)
    cm = torch.bincount(t["labels"] * 10 + t["predictions"], minlength=100).reshape(10, 10)
    assert cm.tolist() == m.metrics.confusion_matrix  # the same argmax the manifest's figures count
    data = bytearray((folder / registry.TEST_PREDICTIONS).read_bytes())
    data[-1] ^= 0xFF
    (folder / registry.TEST_PREDICTIONS).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=registry.TEST_PREDICTIONS):
        artifacts.verify(folder)


# --- compare --------------------------------------------------------------------------------

def test_compare_a_version_with_itself_is_p_1_with_no_discordant_pairs(reg, cli):
    root, weak, _ = reg
    code, out, _ = cli("compare", "--json", "lenet", weak, weak)
    assert code == 0
    c = json.loads(out)
    assert (c["n"], c["a_correct"], c["a_right_b_wrong"], c["a_wrong_b_right"], c["mcnemar_p"], c["diff"]) == \
        (10000, c["b_correct"], 0, 0, 1.0, 0.0)
    assert c["verdict"] == "no significant difference" and c["diff_ci95"][0] < 0 < c["diff_ci95"][1]


def test_compare_two_versions_json_and_table(reg, cli):
    root, weak, strong = reg
    code, out, _ = cli("compare", "--json", "lenet", weak, strong)
    assert code == 0
    c = json.loads(out)
    m_weak = artifacts.read_manifest(root / "lenet" / weak).metrics
    m_strong = artifacts.read_manifest(root / "lenet" / strong).metrics
    assert (c["n"], c["a_correct"], c["b_correct"]) == (10000, m_weak.correct, m_strong.correct)
    assert c["b_correct"] - c["a_correct"] == c["a_wrong_b_right"] - c["a_right_b_wrong"]
    assert c["mcnemar_p"] < 1e-6 and c["verdict"] == "B better" and c["predictions"] == {"a": "stored", "b": "stored"}
    assert c["diff"] == pytest.approx((m_strong.correct - m_weak.correct) / 10000)
    assert 0 < c["diff_ci95"][0] < c["diff"] < c["diff_ci95"][1]
    code, out, _ = cli("compare", "lenet", strong, weak)
    assert code == 0 and "verdict: A better (alpha 0.05)" in out and "McNemar exact p" in out


def test_an_old_version_is_recomputed_like_the_service_and_its_folder_is_not_written(reg):
    root, _, strong = reg
    old = _old_format_copy(root, strong)
    before = {p: p.stat().st_mtime_ns for p in (root / "lenet" / old).rglob("*")}
    c = registry.compare(root, "lenet", strong, old, _official_test_set(None))
    assert c.predictions == {"a": "stored", "b": "recomputed"}
    assert (c.a_right_b_wrong, c.a_wrong_b_right, c.mcnemar_p, c.notes) == (0, 0, 1.0, ())
    assert {p: p.stat().st_mtime_ns for p in (root / "lenet" / old).rglob("*")} == before
    with pytest.raises(registry.RegistryError, match="needs the test images"):
        registry.compare(root, "lenet", strong, old)


def test_compare_refuses_a_test_subset_or_another_dataset_saying_so(reg, cli):
    root, weak, strong = reg
    sub = _rewrite_dataset(root, weak, "20000101-000001-subset", test=512, test_is_full_official_set=False)
    code, _, err = cli("compare", "lenet", sub, strong)
    assert code == 2 and "evaluated on a subset (512 images" in err and "full official test set" in err
    other = _rewrite_dataset(root, weak, "20000101-000002-mnist", name="mnist")
    code, _, err = cli("compare", "lenet", strong, other)
    assert code == 2 and "on fashion_mnist" in err and "on mnist: not the same images" in err


# --- promote, the gate, the log -------------------------------------------------------------

def _log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "lenet" / registry.LOG).read_text().splitlines()]


def test_a_worse_candidate_is_refused_as_champion_unless_forced_and_both_are_logged(reg, cli):
    root, weak, strong = reg
    code, out, _ = cli("promote", "lenet", strong)
    assert code == 0 and f"promoted lenet/{strong} to champion (no holder before: not gated)" in out
    code, out, err = cli("promote", "lenet", weak)
    assert code == 3 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"refused: lenet/{weak} is significantly worse than champion {strong}" in err
    assert "McNemar p = " in err and "--force" in err
    assert artifacts.promoted(root, "lenet") == strong  # the service keeps following the champion
    refused = _log(root)[-1]
    assert (refused["outcome"], refused["from"], refused["to"], refused["forced"]) == ("refused", strong, weak, False)
    assert refused["mcnemar_p"] < 0.05 and refused["to_correct"] < refused["from_correct"] and refused["n"] == 10000

    code, out, _ = cli("promote", "--force", "lenet", weak)
    assert code == 0 and f"promoted lenet/{weak} to champion with --force (was {strong}; McNemar p = " in out
    assert artifacts.promoted(root, "lenet") == weak
    forced = _log(root)[-1]
    assert (forced["outcome"], forced["forced"], forced["mcnemar_p"]) == ("promoted", True, refused["mcnemar_p"])
    assert [r["outcome"] for r in _log(root)] == ["promoted", "refused", "promoted"]
    assert set(forced) == set(registry.LOG_KEYS)


def test_a_better_candidate_passes_the_gate_and_other_aliases_are_not_gated(reg, cli):
    root, weak, strong = reg
    assert cli("promote", "lenet", weak)[0] == 0
    code, out, _ = cli("promote", "lenet", strong)
    assert code == 0 and f"(was {weak}; McNemar p = " in out
    assert _log(root)[-1]["mcnemar_p"] < 0.05 and _log(root)[-1]["forced"] is False
    code, out, _ = cli("promote", "--alias", "challenger", "lenet", weak)  # worse, but not the champion
    assert code == 0 and f"promoted lenet/{weak} to challenger" in out
    assert _log(root)[-1]["mcnemar_p"] is None
    # a candidate that cannot be compared (a test subset) is refused as champion; --force passes it
    sub = _rewrite_dataset(root, strong, "20000101-000001-subset", test=512, test_is_full_official_set=False)
    code, _, err = cli("promote", "lenet", sub)
    assert code == 3 and "cannot be compared with champion" in err and "subset" in err
    assert cli("promote", "--force", "lenet", sub)[0] == 0 and artifacts.promoted(root, "lenet") == sub
    assert "not compared" in _log(root)[-1]["reason"]


def test_aliases_json_and_table(reg, cli):
    root, weak, strong = reg
    assert cli("aliases", "--json", "lenet")[1].strip() == "{}"
    cli("promote", "lenet", strong)
    cli("promote", "--alias", "challenger", "lenet", weak)
    code, out, _ = cli("aliases", "--json", "lenet")
    assert code == 0 and json.loads(out) == {"champion": strong, "challenger": weak}
    assert registry.aliases(root, "lenet") == {"champion": strong, "challenger": weak}
    code, out, _ = cli("aliases", "lenet")
    assert out.splitlines()[0].split() == ["alias", "version", "test_accuracy"]
    assert out.splitlines()[1].split()[:2] == ["champion", strong]
    assert (root / "lenet" / "PROMOTED").read_text() == strong + "\n"  # the file the service reads
    assert (root / "lenet" / "aliases" / "challenger").read_text() == weak + "\n"
    code, _, err = cli("promote", "--alias", "../x", "lenet", weak)
    assert code == 2 and "invalid alias" in err


def test_promote_verifies_the_hashes_first_and_logs_nothing_then(reg, cli):
    root, weak, _ = reg
    w = root / "lenet" / weak / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    code, _, err = cli("promote", "lenet", weak)
    assert code == 2 and "sha256" in err and "model.safetensors" in err
    assert artifacts.promoted(root, "lenet") is None and not (root / "lenet" / registry.LOG).exists()


# --- rollback -------------------------------------------------------------------------------

def test_rollback_restores_the_previous_champion_and_the_service_file_follows(reg, cli):
    root, weak, strong = reg
    cli("promote", "lenet", strong)
    cli("promote", "--force", "lenet", weak)
    code, out, _ = cli("rollback", "lenet")
    assert code == 0 and f"rolled champion of lenet back from {weak} to {strong}" in out
    assert artifacts.promoted(root, "lenet") == strong and artifacts.resolve(root, "lenet").name == strong
    assert (_log(root)[-1]["outcome"], _log(root)[-1]["from"], _log(root)[-1]["to"]) == ("rollback", weak, strong)
    code, _, err = cli("rollback", "lenet")  # the log knows nobody before the first champion
    assert code == 3 and f"knows no holder of 'champion' before {strong}" in err
    assert artifacts.promoted(root, "lenet") == strong


def test_a_second_rollback_goes_one_further_back(reg):
    root, weak, strong = reg
    old = _old_format_copy(root, strong)
    for v in (weak, strong, old):
        registry.promote(root, "lenet", v, alias="challenger")
    assert registry.rollback(root, "lenet", "challenger")["to"] == strong
    assert registry.rollback(root, "lenet", "challenger")["to"] == weak
    with pytest.raises(registry.NothingToRollBack):
        registry.rollback(root, "lenet", "challenger")
    registry.promote(root, "lenet", old, alias="challenger")
    assert registry.rollback(root, "lenet", "challenger")["to"] == weak
    assert registry.holders(registry.read_log(root, "lenet"), "challenger") == [weak]


def test_rollback_refuses_when_the_alias_was_changed_outside_the_registry(reg):
    root, weak, strong = reg
    artifacts.promote(root, "lenet", weak)  # the low-level marker, as before aliases existed: not logged
    with pytest.raises(registry.NothingToRollBack, match="knows no holder"):
        registry.rollback(root, "lenet")
    registry.promote(root, "lenet", strong)  # logged with from=weak: the log now knows both
    (root / "lenet" / "PROMOTED").write_text(weak + "\n")  # by hand
    with pytest.raises(registry.NothingToRollBack, match="changed outside the registry"):
        registry.rollback(root, "lenet")


def test_the_log_is_append_only_json_lines(reg, cli):
    root, weak, strong = reg
    path = root / "lenet" / registry.LOG
    seen = b""
    for args in (("promote", "lenet", strong), ("promote", "lenet", weak), ("promote", "--force", "lenet", weak),
                 ("rollback", "lenet"), ("promote", "--alias", "challenger", "lenet", weak)):
        cli(*args)
        now = path.read_bytes()
        assert now.startswith(seen) and len(now) > len(seen)  # earlier lines never change
        seen = now
    lines = seen.decode().splitlines()
    assert [json.loads(x)["outcome"] for x in lines] == ["promoted", "refused", "promoted", "rollback", "promoted"]
    assert all(list(json.loads(x)) == list(registry.LOG_KEYS) for x in lines)
