"""Where the service's workers run: how many BentoML starts, what resources it is told, which device each uses.

On the CPU the default is one worker per core (BentoML's `cpu_count`). On a GPU, `cpu_count` would make
BentoML assign no GPU at all (`_bentoml_impl/server/allocator.py` returns before it sets
CUDA_VISIBLE_DEVICES) and every worker, one per core, would open its own CUDA context. So when a GPU is
used and WORKERS is unset, the worker count is a number: WORKERS_PER_GPU (8) per visible GPU, at most one
per CPU core and at least one per GPU. The 8 is measured: on one H200 with 16 cores, 8 GPU workers
answered single-image /predict at c=256 with 9,232 req/s, p99 53 ms, against 5,753 req/s, p99 91 ms
with 4 (docs/serving.md "GPU"). BentoML is told `resources={"gpu": k}` for the k GPUs used; with a
numeric worker count its allocator sets CUDA_VISIBLE_DEVICES to those k GPUs for every worker (the same
for all workers: BentoML 1.4 has one environment per service), and worker i uses GPU (i - 1) mod k of them,
so each worker runs on exactly one GPU and the workers are spread evenly over the GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.settings import Settings


@dataclass(frozen=True)
class Placement:
    workers: int | str  # BentoML's `workers`: a number, or "cpu_count"
    resources: dict  # BentoML's `resources`
    gpus: int  # GPUs the workers are spread over (0: the CPU)


def uses_gpu(s: Settings, cuda_available: bool) -> bool:
    return s.device.startswith("cuda") or (s.device == "auto" and cuda_available)


def plan(s: Settings, cuda_available: bool, visible_gpus: int, cpus: int) -> Placement:
    """The placement for settings `s` on a host with `visible_gpus` GPUs torch sees and `cpus` cores."""
    if not uses_gpu(s, cuda_available):
        return Placement(s.workers or "cpu_count", {"cpu": "1"}, 0)
    visible = max(visible_gpus, 1)
    gpus = 1 if ":" in s.device else visible  # cuda:N: that one GPU (all stay visible, so N stays valid)
    workers = s.workers if s.workers is not None else max(gpus, min(s.workers_per_gpu * gpus, cpus))
    return Placement(workers, {"gpu": visible}, gpus)


def detect(s: Settings) -> Placement:
    """The placement on this host (torch for the GPUs, BentoML's own CPU count, which honours cgroup limits)."""
    import torch
    from bentoml._internal.resource import CpuResource

    cuda = torch.cuda.is_available()
    return plan(s, cuda, torch.cuda.device_count() if cuda else 0, max(1, int(CpuResource.from_system())))


def worker_device(s: Settings, placement: Placement, worker_index: int | None) -> str:
    """The device of the worker with BentoML's 1-based `worker_index` (None outside a server)."""
    if placement.gpus <= 1 or s.device.startswith("cuda:") or worker_index is None:
        return s.device
    return f"cuda:{(worker_index - 1) % placement.gpus}"
