"""Connections spread over the workers (service/accept.py): connections opened together are shared by the
workers of a real `bentoml serve`, instead of the first worker to wake taking all of them."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.harness import Server, wrk
from tests.conftest import lenet_env

pytestmark = pytest.mark.slow
ONE_IMAGE = json.dumps({"images": [[[0] * 28] * 28]}).encode()


def _established_inodes(port: int) -> set[str]:
    """Socket inodes of the server side of this machine's established TCP connections on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if local_port == port and state == "01":
                inodes.add(inode)
    return inodes


def _parent(pid: str) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]


def _connections_per_process(root: int, port: int) -> Counter:
    """{pid: established connections it holds on `port`} for the processes under `root` (the server's)."""
    inodes, held = _established_inodes(port), Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ancestor = pid
            while ancestor not in ("0", "1", str(root)):
                ancestor = _parent(ancestor)
            if ancestor != str(root):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    held[pid] += 1
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return held


def test_64_connections_opened_at_once_are_shared_by_both_workers(lenet_version):
    """wrk opens its 64 connections together and keeps them: each worker must hold a real share of them
    (before service/accept.py, one worker took all 64 in 5 of 6 such runs and the other one idled)."""
    if not shutil.which("wrk"):
        pytest.fail("wrk is missing: apt-get install wrk")
    with Server(lenet_env(lenet_version), workers=2) as s:
        for run in range(3):
            seen: list[Counter] = []

            def sample():
                time.sleep(1.5)  # the connections are open and answering by now
                seen.append(_connections_per_process(s.proc.pid, s.port))

            sampler = threading.Thread(target=sample)
            sampler.start()
            r = wrk(s.url + "/predict", ONE_IMAGE, connections=64, seconds=3)
            sampler.join()
            held = seen[0]
            print(f"run {run}: connections per worker {sorted(held.values())}, {r['requests_per_s']:.0f} req/s")
            assert sum(held.values()) == 64, held
            assert len(held) == 2 and min(held.values()) >= 8, held
            assert r["non_2xx"] == 0, r["text"]
