"""service/rollout.py without a server: which model answers (pin, canary, shadow) and what CHALLENGER names.
The same behaviour on real servers: tests/test_rollout_service.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from core import registry
from service import rollout
from service.inference import InputError

SPEC = SimpleNamespace(shape=(1, 28, 28))
CLASSES = ["a", "b"]


def model(version: str, shape=(1, 28, 28), classes=CLASSES):
    return SimpleNamespace(version=version, spec=SimpleNamespace(shape=shape), classes=list(classes))


CHAMPION, CHALLENGER = model("v1"), model("v2")


@pytest.fixture
def pinned():
    def set_pin(version):
        rollout.PINNED.set(version)
    yield set_pin
    rollout.PINNED.set(None)


def test_without_a_challenger_the_champion_answers_unshadowed():
    assert rollout.choose(CHAMPION, None, 100, shadow=True) == (CHAMPION, None)


def test_the_canary_share_and_the_shadow():
    random.seed(1)
    picks = [rollout.choose(CHAMPION, CHALLENGER, 30, shadow=True) for _ in range(2000)]
    canary = sum(m is CHALLENGER for m, _ in picks)
    assert 520 <= canary <= 680  # Binomial(2000, 0.3): mean 600, sd 20.5
    assert all(s is None for m, s in picks if m is CHALLENGER)  # a canary answer is not shadowed
    assert all(s is CHALLENGER for m, s in picks if m is CHAMPION)
    assert all(rollout.choose(CHAMPION, CHALLENGER, 0, shadow=False) == (CHAMPION, None) for _ in range(200))
    assert all(rollout.choose(CHAMPION, CHALLENGER, 100, shadow=True) == (CHALLENGER, None) for _ in range(200))


def test_a_pin_names_the_answering_version_and_is_never_shadowed(pinned):
    for m in (CHAMPION, CHALLENGER):
        pinned(m.version)
        assert rollout.choose(CHAMPION, CHALLENGER, 50, shadow=True) == (m, None)


def test_a_pin_to_a_version_not_loaded_is_409_naming_the_loaded_versions(pinned):
    pinned("v9")
    with pytest.raises(InputError) as e:
        rollout.choose(CHAMPION, CHALLENGER, 0, shadow=False)
    assert (e.value.status, e.value.reason) == (409, "version_not_loaded")
    assert "'v9'" in str(e.value) and "v1 (champion), v2 (challenger)" in str(e.value)
    pinned("v2")
    with pytest.raises(InputError, match=r"loaded versions: v1 \(champion\)$"):
        rollout.choose(CHAMPION, None, 0, shadow=False)


def test_a_challenger_of_another_shape_or_classes_never_answers():
    for other in (model("v3", shape=(3, 28, 28)), model("v4", classes=["a", "c"])):
        assert rollout.choose(CHAMPION, other, 100, shadow=True) == (CHAMPION, None)


def test_the_pin_is_read_from_the_header_case_insensitively():
    rollout.pin([(b"content-type", b"application/json"), (b"X-Model-Version", b" v2 ")])
    assert rollout.PINNED.get() == "v2"
    rollout.pin([(b"content-type", b"application/json")])
    assert rollout.PINNED.get() is None


def test_challenger_source_a_version_is_pinned_an_alias_is_followed(tmp_path):
    (tmp_path / "m" / "v1").mkdir(parents=True)
    (tmp_path / "m" / "v1" / "manifest.json").write_text("{}")
    pinned = rollout.ChallengerSource(str(tmp_path), "m", "v1", default=False)
    assert pinned.pinned and pinned.version() == "v1"
    default = rollout.ChallengerSource(str(tmp_path), "m", registry.CHALLENGER, default=True)
    assert not default.pinned and default.version() is None and default.unset_error() is None
    registry._write_alias(tmp_path, "m", registry.CHALLENGER, "v1")
    assert default.version() == "v1"
    named = rollout.ChallengerSource(str(tmp_path), "m", "canary", default=False)
    assert named.version() is None and "'canary' is neither a version of m nor a set alias" in named.unset_error()
    assert rollout.info(rollout.ChallengerSource(str(tmp_path), "m", None, default=False), None, None) is None
