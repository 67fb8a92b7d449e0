"""Crash safety of publishing: kills at many points and a really full disk never leave a half version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import artifacts

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "lenet", "--limit-train", "2048", "--limit-test", "1000", "--epochs", "2", "--batch-size", "128"]


def _train(art: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training", "train", *TINY, "--artifacts-dir", str(art), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _assert_only_complete_versions(art: Path) -> list[str]:
    versions = artifacts.list_versions(art, "lenet")
    for v in versions:
        artifacts.verify(art / "lenet" / v)  # every visible version is whole and matches its hashes
    if (art / "lenet").is_dir():
        visible = [p.name for p in (art / "lenet").iterdir() if not p.name.startswith(".") and p.name != "PROMOTED"]
        assert sorted(visible) == versions, f"half-written folders visible: {set(visible) - set(versions)}"
    return versions


@pytest.mark.slow
def test_sigkill_at_many_points_never_leaves_a_half_version(tmp_path):
    art = tmp_path / "art"
    t0 = time.monotonic()
    full = _train(art)
    out, _ = full.communicate(timeout=300)
    total = time.monotonic() - t0
    assert full.returncode == 0, out
    assert len(_assert_only_complete_versions(art)) == 1
    published = 1
    # kill points spread over start-up, training, evaluation and publishing
    for frac in (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98):
        p = _train(art)
        time.sleep(frac * total)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        versions = _assert_only_complete_versions(art)
        assert len(versions) in (published, published + 1)
        published = len(versions)
    # a later publisher sweeps the temporary folders of killed ones
    done = _train(art)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    assert not list((art / "lenet").glob(".tmp-*"))
    _assert_only_complete_versions(art)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 128 KiB filesystem: smaller than LeNet's 247 KB of weights."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("checkpoint", ["--no-checkpoint", "--checkpoint"])
def test_full_disk_leaves_no_version_and_a_clear_error(tiny_disk, checkpoint):
    """Without checkpoints the disk fills while publishing; with them, at the first checkpoint."""
    p = _train(tiny_disk, checkpoint)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2, out
    assert "No space left" in out or "no space left" in out, out
    assert "nothing was published" in out, out
    assert "Traceback" not in out
    assert artifacts.list_versions(tiny_disk, "lenet") == []
    assert not list((tiny_disk / "lenet").glob(".tmp-*"))
