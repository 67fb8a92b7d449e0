"""The Makefile's set-up steps for `make test` on a fresh machine (dry runs and the tools check; nothing installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _make(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    return subprocess.run([MAKE, "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)


def test_make_test_installs_the_dataset_and_the_tools_before_pytest():
    r = _make("-n", "test")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "dataset-fashion-mnist" in out and "wrk:wrk promtool:prometheus prometheus:prometheus" in out
    assert out.index("dataset-fashion-mnist") < out.index("promtool:prometheus") < out.index("-m pytest")


def test_tools_present_installs_nothing():
    r = _make("tools")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_a_missing_tool_without_apt_or_root_is_one_line_naming_the_package(tmp_path):
    """A PATH without the tools and without apt-get: the error names the Debian packages to install."""
    for cmd in ("sort", "tr", "id"):
        (tmp_path / cmd).symlink_to(shutil.which(cmd))
    r = _make("tools", path=str(tmp_path))
    assert r.returncode != 0
    assert r.stdout == ("error: the tests need the Debian package(s) prometheus wrk: "
                        "run 'sudo apt-get install prometheus wrk'\n")
