"""Issue 11: the concurrency limit holds for the whole service (no refusal below it, whatever the worker
count), fast 429s with Retry-After above it, and the default worker count on a GPU host.

The real-server tests start `bentoml serve` (bench/harness.py); the rest fake processes or CUDA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.harness import Server, wrk
from tests.conftest import lenet_env

ONE_IMAGE = json.dumps({"images": [[[0] * 28] * 28]}).encode()


@pytest.mark.slow
def test_eight_workers_at_256_connections_refuse_nothing(lenet_version):
    """256 connections never hold more than the default MAX_CONCURRENCY (256) in flight, so nothing is
    refused, however unevenly the kernel spreads the connections over 8 workers."""
    if not shutil.which("wrk"):
        pytest.fail("wrk is missing: apt-get install wrk")
    with Server(lenet_env(lenet_version), workers=8, ready_timeout=300) as s:
        r = wrk(s.url + "/predict", ONE_IMAGE, connections=256, seconds=15, threads=2, statuses=True)
    print(f"\n8 workers, c=256: {r['requests']} requests, {r['requests_per_s']:.0f} req/s, "
          f"statuses {dict(r['statuses'])}, socket errors {r['socket_errors']}")
    assert r["requests"] > 1000, r["text"]
    assert r["non_2xx"] == 0 and set(r["statuses"]) == {200}, r["text"]


# ------------------------------------------------------------------------------------------
# the shared in-flight count (service/admission.py) across real processes

def _worker(path, slots, index, adds, ready, go, done, leave):
    from service.admission import SharedCount

    count = SharedCount(path, slots, index)
    for _ in range(adds):
        count.add(1)
    ready.set()
    go.wait(30)
    count.add(-1)  # one request answered
    done.set()
    leave.wait(30)
    count.close()


def test_the_in_flight_count_is_shared_by_the_workers_of_one_server_and_removed_after_them(tmp_path):
    import multiprocessing as mp

    from service.admission import Admission, Overloaded, SharedCount

    ctx = mp.get_context("fork")  # each a separate process, as BentoML's workers
    path, slots = tmp_path / "imgclf-inflight-1-2", 4
    ready, done, go, leave = [ctx.Event() for _ in range(3)], [ctx.Event() for _ in range(3)], ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(path, slots, i + 1, 3 + i, ready[i], go, done[i], leave))
             for i in range(3)]
    for p in procs:
        p.start()
    for e in ready:
        assert e.wait(60)
    mine = SharedCount(path, slots, 0)  # the 4th worker: sees the other three's 3 + 4 + 5 requests
    assert mine.total() == 12
    admission = Admission(mine, limit=14, heavy_limit=1)
    admission.enter("/predict")
    admission.enter("/evaluate")
    assert mine.total() == 14
    with pytest.raises(Overloaded) as refused:  # 14 in flight over all workers: the limit
        admission.enter("/predict")
    assert (refused.value.status, refused.value.reason, refused.value.retry_after) == (429, "overloaded", 1)
    go.set()
    for e in done:
        assert e.wait(60)
    assert mine.total() == 11  # each of the three answered one
    admission.enter("/predict")  # room again
    with pytest.raises(Overloaded) as refused:  # but this worker already runs its one evaluation
        admission.enter("/evaluate_npz")
    assert refused.value.reason == "heavy_overloaded"
    admission.leave("/evaluate")
    admission.enter("/evaluate_npz")
    leave.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert mine.total() == 3 and path.exists()  # the others left: only this worker's places count
    mine.close()
    assert not path.exists()  # the last one out removed the file


def test_a_replacement_worker_starts_its_slot_from_zero_and_stale_files_are_removed(tmp_path):
    from service.admission import SharedCount, remove_stale, server_file

    path = server_file(os.getpid(), tmp_path)
    first = SharedCount(path, 2, 1)
    first.add(5)  # then the worker dies without closing
    replacement = SharedCount(path, 2, 1)  # BentoML restarts it with the same index
    assert replacement.total() == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"imgclf-inflight-{dead.pid}-1"  # a server that was killed: its pid has ended
    gone.write_bytes(b"\1" * 32)
    reused = tmp_path / f"imgclf-inflight-{os.getpid()}-1"  # this pid, but a start time of another process
    reused.write_bytes(b"\1" * 32)
    assert sorted(remove_stale(tmp_path)) == sorted([gone, reused])
    assert path.exists()  # the live server's file stays
    replacement.close()


# ------------------------------------------------------------------------------------------
# the default worker count on a GPU host (service/placement.py), CUDA faked

@pytest.fixture
def fake_host(monkeypatch):
    """A host with `gpus` CUDA GPUs and `cpus` cores, as torch and BentoML see it."""
    import torch
    from bentoml._internal import resource

    def make(gpus: int, cpus: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(resource.CpuResource, "from_system", classmethod(lambda cls: float(cpus)))
        monkeypatch.setattr(resource.NvidiaGpuResource, "from_system", classmethod(lambda cls: list(range(gpus))))
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("BENTOML_DISABLE_GPU_ALLOCATION", raising=False)
    return make


def _bentoml_worker_env(p) -> tuple[int, dict]:
    """What BentoML's own allocator gives the workers of a service declared with placement `p`."""
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():  # pathspec's deprecation, raised while BentoML's SDK is imported
        warnings.simplefilter("ignore", DeprecationWarning)
        from _bentoml_impl.server.allocator import ResourceAllocator

    config = {"imgclf": {"workers": p.workers, "resources": p.resources}}
    return ResourceAllocator().get_worker_env(SimpleNamespace(name="imgclf"), services=config)


def test_on_one_gpu_the_default_is_8_workers_each_given_the_gpu_by_bentoml(fake_host):
    from service import placement
    from service.settings import Settings

    fake_host(gpus=1, cpus=16)
    for device in ("auto", "cuda"):
        s = Settings.from_env({"DEVICE": device})
        p = placement.detect(s)
        assert (p.workers, p.resources, p.gpus) == (8, {"gpu": 1}, 1)
        assert _bentoml_worker_env(p) == (8, {"CUDA_VISIBLE_DEVICES": "0"})  # every worker pinned to the GPU
        assert {placement.worker_device(s, p, i) for i in range(1, 9)} == {device}
    fake_host(gpus=1, cpus=2)  # never more workers than cores
    assert placement.detect(Settings()).workers == 2
    # what the default was before: cpu_count workers, to which BentoML assigns no GPU at all
    assert _bentoml_worker_env(placement.Placement("cpu_count", {"gpu": 1}, 1)) == (2, {})


def test_on_two_gpus_each_worker_uses_one_gpu_and_they_are_spread_evenly(fake_host):
    from collections import Counter

    from service import placement
    from service.settings import Settings

    fake_host(gpus=2, cpus=32)
    s = Settings()
    p = placement.detect(s)
    assert (p.workers, p.resources) == (16, {"gpu": 2})
    assert _bentoml_worker_env(p) == (16, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert Counter(placement.worker_device(s, p, i) for i in range(1, 17)) == {"cuda:0": 8, "cuda:1": 8}
    pinned = Settings.from_env({"DEVICE": "cuda:1"})  # one named GPU: 8 workers on it, all GPUs kept visible
    p = placement.detect(pinned)
    assert (p.workers, p.resources, placement.worker_device(pinned, p, 3)) == (8, {"gpu": 2}, "cuda:1")


def test_on_the_cpu_or_with_workers_set_the_count_is_as_before(fake_host):
    from service import placement
    from service.settings import Settings

    fake_host(gpus=1, cpus=16)
    assert placement.detect(Settings.from_env({"DEVICE": "cpu"})) == placement.Placement("cpu_count", {"cpu": "1"}, 0)
    assert placement.detect(Settings.from_env({"WORKERS": "3"})).workers == 3
    assert placement.detect(Settings.from_env({"WORKERS_PER_GPU": "4"})).workers == 4
    assert Settings.from_env({"WORKERS": ""}).workers is None  # `make` passes an unset WORKERS as ""
    fake_host(gpus=0, cpus=16)
    assert placement.detect(Settings()).workers == "cpu_count"


# ------------------------------------------------------------------------------------------
# the device check of serving (bench/gpu_serve.py), tiny and on the CPU so it is known to run

@pytest.mark.slow
def test_the_serving_device_check_runs_tiny_on_the_cpu(lenet_version, capsys):
    from bench import gpu_serve

    root, name, _, _ = lenet_version
    out = gpu_serve.main(["--artifacts-dir", str(root), "--model-name", name, "--devices", "cpu",
                          "--connections", "2", "4", "--seconds", "2", "--processes", "2", "--npz-images", "500"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    cpu = out["cpu"]
    assert cpu["device"] == "cpu" and cpu["workers"] == os.cpu_count()  # the default: one worker per core
    assert [r["connections"] for r in cpu["load"]] == [2, 4]
    for r in cpu["load"]:
        assert r["requests"] > 0 and r["non_2xx"] == 0 and r["statuses"] == {"200": r["requests"]}, r
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert 0 < cpu["evaluate_npz_500_s"]["best"] <= cpu["evaluate_npz_500_s"]["median"]
