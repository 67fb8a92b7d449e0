"""Data-parallel training across processes with torch.distributed (DistributedDataParallel).

    torchrun --nproc-per-node 2 -m training.distributed [train] <the flags of `python -m training train`>

gloo on CPU, nccl on CUDA (one GPU per process, cuda:LOCAL_RANK). Every rank builds the same run from
the config (same seed: same split, same initial weights; DDP also broadcasts rank 0's weights), then
keeps a disjoint, equal-sized shard of the seeded training permutation (rank r takes every world-th
image). --batch-size stays the global batch: each rank trains on batch_size / world images per step
and DDP averages the gradients, so the optimiser sees the same step count and batch as one process.
Validation runs on every rank (identical weights, so identical early-stopping decisions); rank 0
alone evaluates on the test set and publishes the version with training.pipeline, in the same
artifact format as `python -m training train`, plus a "distributed" block in the manifest.

Not supported here: --resume / per-epoch checkpoints (each rank has its own augmentation stream).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from core import artifacts
from training.config import TrainConfig
from training.engine import fit
from training.optim import build_optimizer, build_schedule
from training.pipeline import evaluate_and_publish, prepare
from training.run import Batches


def shard(data: Batches, rank: int, world: int) -> Batches:
    """Rank's disjoint share of `data` (already a seeded permutation): every world-th image from rank,
    cut to the same length on every rank so all ranks take the same number of steps."""
    n = len(data) // world
    idx = torch.arange(rank, n * world, world, device=data.x.device)
    return Batches(data.x[idx], data.y[idx], data.mean, data.std)


def train_distributed(cfg: TrainConfig, log=print) -> str | None:
    """Run this process's rank; rank 0 returns the published folder, the others None."""
    if cfg.resume:
        raise ValueError("--resume is not supported by training.distributed; train without it")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    started = time.perf_counter()
    run = prepare(cfg)
    artifacts.check_name(cfg.resolved_name(), "model name")  # a bad name fails now, not after training
    local = shard(run.train, rank, world)
    # fit() and the schedule see the per-rank batch; the manifest keeps the user's (global) config
    rank_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // world, checkpoint=False)
    ddp = DDP(run.model, device_ids=[torch.cuda.current_device()] if run.device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, ddp.parameters())
    scheduler = build_schedule(rank_cfg, optimizer, -(-len(local) // rank_cfg.batch_size))
    # each rank its own order and augmentation draws; all start from the same seed
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    rank_run = dataclasses.replace(run, train=local, model=ddp, optimizer=optimizer, scheduler=scheduler,
                                   generator=gen)
    if rank == 0:
        log(f"training {cfg.model} on {run.dataset.name} with {world} processes ({dist.get_backend()}, "
            f"{run.device}): {len(local)} train images per rank, batch {rank_cfg.batch_size} per rank "
            f"({cfg.batch_size} global), {sum(p.numel() for p in run.model.parameters()):,} parameters")
    state = fit(rank_run, rank_cfg, log=(lambda r: log(json.dumps(r))) if rank == 0 else (lambda r: None))
    seconds = time.perf_counter() - started
    folder = None
    if rank == 0:
        distributed = {"world_size": world, "backend": dist.get_backend(),
                       "train_images_per_rank": len(local), "batch_size_per_rank": rank_cfg.batch_size}
        # the plain module and the whole training set: no DDP hooks (and so no collectives) during
        # rank 0's test evaluation, and the manifest counts every training image
        folder = str(evaluate_and_publish(cfg, run, state, seconds, distributed=distributed))
    dist.barrier()
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    from training.__main__ import _add_config_flags, _config

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # accept `... -m training.distributed train <flags>` like the main CLI
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m training.distributed",
                                     description=__doc__.split("\n")[0], allow_abbrev=False)
    _add_config_flags(parser)
    ns = parser.parse_args(argv)
    if "RANK" not in os.environ:
        print("error: start this module with torchrun, e.g. torchrun --nproc-per-node 2 -m training.distributed",
              file=sys.stderr)
        return 2
    try:
        cfg = _config(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
    elif not cfg.threads:
        # the processes on one machine share its cores; oversubscription costs more than it gives
        per_proc = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        cfg = dataclasses.replace(cfg, threads=per_proc)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        folder = train_distributed(cfg)
        if folder is not None:
            m = json.loads(open(os.path.join(folder, "manifest.json")).read())
            print(f"published {folder}")
            print(f"test accuracy {m['test_accuracy']:.4f}, trained in {m['training_seconds']:.1f} s "
                  f"on {dist.get_world_size()} processes")
    except (ValueError, artifacts.ArtifactError, OSError, RuntimeError) as e:
        print(f"error (rank {dist.get_rank()}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
