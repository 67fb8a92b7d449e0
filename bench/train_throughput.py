"""Training images/s: the project's loop against the tutorial-style loop, same LeNet, same run.

    python -m bench.train_throughput [--rounds 5] [--batches-4 400] [--batches-64 150] [--batches-128 80] [--quick]

project   training.engine.train_one_epoch on in-memory uint8 tensors: each batch is one slice,
          scaled and normalised as a whole; the model in the lenet preset's layout (channels_last)
tutorial  a torchvision.datasets-style Dataset (PIL image per sample, then ToTensor + Normalize)
          through a DataLoader (shuffle, num_workers=0), the loop of the PyTorch tutorials
model     the ceiling: forward, backward and SGD step alone on ready, normalised float batches (no data
          work at all) of the tutorial's model (NCHW); no loop around that model can beat it, so
          model / tutorial bounds the ratio any data pipeline alone can give

Both train the same LeNet with the same SGD for a fixed number of batches per measurement.
Rounds interleave the loops and batch sizes (the order alternates each round), so a burst of load
from something else on the machine hits both; the table reports medians over rounds. Results go to
bench/results/train_throughput.json (and a time-stamped copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

from core.models import LeNet
from training.config import PRESETS
from training.data import channel_stats, load_dataset
from training.engine import Batches, train_one_epoch

RESULTS = Path(__file__).parent / "results"
BATCH_SIZES = (4, 64, 128)  # 4 and 64: the tutorial's; 128: the lenet preset's batch


class TutorialDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.FashionMNIST.__getitem__ does: uint8 array -> PIL image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data, self.targets, self.transform = images[:, 0], labels, transform  # (N, H, W) uint8

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i].numpy())  # (H, W) uint8 -> a mode "L" image
        return self.transform(img), int(self.targets[i])


def _model_and_optimizer(seed: int, **kwargs):
    torch.manual_seed(seed)
    model = LeNet(1, 28, 28, 10, **kwargs)  # same seed: the same initial weights whatever the layout
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), nn.CrossEntropyLoss()


def tutorial_loop(images, labels, mean, std, batch_size: int, batches: int, seed: int) -> float:
    """Images/s of the classic loop over the first batch_size * batches images."""
    n = batch_size * batches
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(TutorialDataset(images[:n], labels[:n], tf), batch_size=batch_size,
                                         shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    model, opt, crit = _model_and_optimizer(seed)
    model.train()
    seen = 0
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def project_loop(images, labels, mean, std, batch_size: int, batches: int, seed: int) -> float:
    """Images/s of training.engine.train_one_epoch over the same images (no augmentation, no progress bar),
    with the lenet preset's model settings (channels_last)."""
    n = batch_size * batches
    data = Batches(images[:n], labels[:n], torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1))
    model, opt, crit = _model_and_optimizer(seed, **PRESETS["lenet"]["model_kwargs"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    out = train_one_epoch(model, crit, opt, sched, data, batch_size, torch.Generator().manual_seed(seed), False)
    return out["images_per_s"]


def model_only(images, labels, mean, std, batch_size: int, batches: int, seed: int) -> float:
    """Images/s of the bare step on pre-normalised batches in order: the compute ceiling of any loop."""
    n = batch_size * batches
    x = (images[:n].float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    y = labels[:n]
    model, opt, crit = _model_and_optimizer(seed)
    model.train()
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        opt.zero_grad(set_to_none=True)
        crit(model(x[i:i + batch_size]), y[i:i + batch_size]).backward()
        opt.step()
    return n / (time.perf_counter() - start)


LOOPS = {"project": project_loop, "tutorial": tutorial_loop, "model": model_only}


def _machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}


def conditions(load_before: tuple[float, float, float]) -> dict:
    """Where and when a measurement ran: the machine, the load average before (taken by the caller
    at the start) and now, and the UTC time. Shared by the training benchmarks' JSON."""
    return {"loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "machine": _machine(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def load_text(result: dict) -> str:
    return f"load average before {result['loadavg_before'][0]}, after {result['loadavg_after'][0]}"


def run(rounds: int, batches: dict[int, int], seed: int = 0, log=print) -> dict:
    ds = load_dataset("fashion_mnist")
    need = max(bs * n for bs, n in batches.items())
    images, labels = ds.train_x[:need], ds.train_y[:need]
    mean, std = channel_stats(ds.train_x)
    load_before = os.getloadavg()
    # warm-up: first calls pay for oneDNN kernel selection and allocator growth
    for fn in LOOPS.values():
        for bs in batches:
            fn(images, labels, mean, std, bs, min(batches[bs], 20), seed)
    samples: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in batches} for name in LOOPS}
    started = time.perf_counter()
    for r in range(rounds):
        order = list(LOOPS) if r % 2 == 0 else list(reversed(LOOPS))
        for bs in (batches if r % 2 == 0 else reversed(list(batches))):
            for name in order:
                samples[name][bs].append(LOOPS[name](images, labels, mean, std, bs, batches[bs], seed + r))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{name} b{bs} {samples[name][bs][-1]:,.0f}"
                                                  for bs in batches for name in LOOPS) + " img/s")
    rows = []
    for bs in batches:
        p, t = statistics.median(samples["project"][bs]), statistics.median(samples["tutorial"][bs])
        c = statistics.median(samples["model"][bs])
        rows.append({"batch_size": bs, "batches_per_measurement": batches[bs],
                     "project_images_per_s": round(p, 1), "tutorial_images_per_s": round(t, 1),
                     "model_only_images_per_s": round(c, 1), "ratio": round(p / t, 2),
                     "ceiling_ratio": round(c / t, 2),
                     "project_samples": [round(v, 1) for v in samples["project"][bs]],
                     "tutorial_samples": [round(v, 1) for v in samples["tutorial"][bs]]})
    return {"benchmark": "train_throughput", "model": "lenet", "dataset": ds.name, "rounds": rounds,
            "statistic": "median over interleaved rounds", "rows": rows,
            "seconds": round(time.perf_counter() - started, 1),
            **conditions(load_before)}


def table(result: dict) -> str:
    lines = ["| batch | project loop (img/s) | tutorial loop (img/s) | ratio | bare step, NCHW (img/s) "
             "| ceiling ratio |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch_size']} | {r['project_images_per_s']:,.0f} | {r['tutorial_images_per_s']:,.0f} "
                     f"| {r['ratio']:.2f}x | {r['model_only_images_per_s']:,.0f} | {r['ceiling_ratio']:.2f}x |")
    m = result["machine"]
    lines.append(f"\nLeNet, Fashion-MNIST, median of {result['rounds']} interleaved rounds; {m['cpu']}, "
                 f"{m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); {load_text(result)}; "
                 f"{result['created_at']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported (default 5)")
    p.add_argument("--batches-4", type=int, default=400, help="batches per measurement at batch 4 (default 400)")
    p.add_argument("--batches-64", type=int, default=150, help="batches per measurement at batch 64 (default 150)")
    p.add_argument("--batches-128", type=int, default=80, help="batches per measurement at batch 128 (default 80)")
    p.add_argument("--quick", action="store_true", help="1 round of 20 batches: a smoke test, not a measurement")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (default bench/results)")
    a = p.parse_args(argv)
    rounds, batches = ((1, {4: 20, 64: 20, 128: 20}) if a.quick
                       else (a.rounds, {4: a.batches_4, 64: a.batches_64, 128: a.batches_128}))
    if rounds < 1 or min(batches.values()) < 1:
        p.error("--rounds and --batches-* must be at least 1")
    result = run(rounds, batches)
    a.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    (a.out / "train_throughput.json").write_text(text)
    (a.out / f"train_throughput-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json").write_text(text)
    print(table(result))
    print(f"saved {a.out / 'train_throughput.json'}")
    return result


if __name__ == "__main__":
    main()
