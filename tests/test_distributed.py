"""training.distributed: 2 CPU processes under torchrun (gloo) publish a complete, verifiable version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import artifacts
from training.distributed import shard
from training.engine import Batches

ROOT = Path(__file__).resolve().parent.parent


def test_shards_are_disjoint_equal_and_cover_the_permutation():
    x = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1)
    data = Batches(x, torch.arange(11), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    parts = [shard(data, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]  # equal: every rank takes the same number of steps
    seen = torch.cat([p.y for p in parts])
    assert len(set(seen.tolist())) == 9 and set(seen.tolist()) <= set(range(11))
    assert torch.equal(parts[1].x.flatten().long(), parts[1].y)  # images stay with their labels


def test_torchrun_two_processes_publish_a_verified_version(tmp_path):
    art = tmp_path / "artifacts"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.distributed", "train", "--model", "lenet", "--limit-train", "1024",
           "--limit-test", "256", "--epochs", "2", "--batch-size", "128", "--artifacts-dir", str(art)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.findall(r"^published (.+)$", proc.stdout, re.M)
    assert len(found) == 1, proc.stdout  # rank 0 alone publishes
    folder = Path(found[0].strip())
    assert folder.parent == art / "lenet" and artifacts.list_versions(art, "lenet") == [folder.name]

    manifest = artifacts.verify(folder)  # every listed file hashes to the manifest's sha256
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo", "train_images_per_rank": 461,
                                       "batch_size_per_rank": 64}
    assert manifest["config"]["batch_size"] == 128  # the user's global batch is what the manifest keeps
    assert manifest["dataset"]["train"] == 922 and manifest["dataset"]["test"] == 256
    assert len(manifest["history"]) == 2 and all("val_accuracy" in h for h in manifest["history"])
    assert sum(map(sum, manifest["confusion_matrix"])) == 256
    assert 0.0 <= manifest["test_accuracy"] <= 1.0

    loaded = artifacts.load(art, "lenet", folder.name)  # the service's path: verify, rebuild, load weights
    assert loaded.manifest["weights_sha256"] == artifacts.sha256_file(folder / "model.safetensors")
    assert not any(k.startswith("module.") for k in loaded.model.state_dict())

    weights = folder / "model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(artifacts.IntegrityError, match="sha256"):
        artifacts.verify(folder)


def test_refuses_to_run_outside_torchrun():
    proc = subprocess.run([sys.executable, "-m", "training.distributed", "--model", "lenet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert proc.returncode == 2 and "torchrun" in proc.stderr
