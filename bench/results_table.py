"""The results table: each model's preset trained with 3 seeds by the real CLI, next to published figures.

    python -m bench.results_table [--models cnn lenet] [--seeds 0 1 2]      (make results)

Each run is exactly what a user types (`python -m training train --model M --seed S`), timed as a
whole command (start-up, data loading, training, test evaluation, publishing), into a temporary
artifacts folder that is removed afterwards. Accuracy is on the full official 10,000-image test
set, reported as mean ± sample sd over the seeds. Writes bench/results/results_table.{json,md}.
About 20 minutes on 2 cores for the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.train_throughput import conditions, load_text

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# Fashion-MNIST's own benchmark table (zalandoresearch/fashion-mnist README), test accuracy.
PUBLISHED = [
    ("LeNet-like 2-conv nets", "0.876 to 0.920"),
    ("2-conv + BatchNorm or augmentation", "0.934 to 0.939"),
    ("ResNet18", "0.949"),
    ("WRN-28-10 + random erasing", "0.963"),
    ("human", "0.835"),
]


def run_one(model: str, seed: int, artifacts_dir: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "training", "train", "--model", model, "--seed", str(seed),
           "--artifacts-dir", artifacts_dir, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    folder = re.search(r"^published (.+)$", proc.stdout, re.M).group(1).strip()
    m = json.loads((Path(ROOT, folder) / "manifest.json").read_text())
    return {"model": model, "seed": seed, "wall_seconds": round(wall, 1), "training_seconds": m["training_seconds"],
            "test_accuracy": m["test_accuracy"], "parameters": m["model"]["parameters"],
            "epochs": len(m["history"]), "tta_flip": m["model"]["tta_flip"], "kwargs": m["model"]["kwargs"],
            "command": "python -m training train --model " + model + " --seed " + str(seed)}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(result: dict) -> str:
    lines = ["| model | parameters | epochs | wall s (mean, max) | test accuracy (mean ± sd) | runs |",
             "|---|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append(f"| {s['model']} (this repo) | {s['parameters']:,} | {s['epochs']} | "
                     f"{s['wall_mean']:.0f}, {s['wall_max']:.0f} | {s['accuracy_mean']:.4f} ± {s['accuracy_sd']:.4f} | "
                     f"{s['n']} seeds |")
    for name, acc in PUBLISHED:
        lines.append(f"| {name} (published) | | | | {acc} | |")
    m = result["machine"]
    lines.append(f"\nMeasured {result['created_at']} on {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
                 f"seeds {', '.join(map(str, result['seeds']))}; {load_text(result)}; "
                 "wall = the whole `python -m training train` command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.results_table", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--models", nargs="+", default=["cnn", "lenet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--extra", default="", help="extra flags for every run, e.g. '--limit-train 2000 --epochs 1'")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="results-table-")
    load_before = os.getloadavg()
    runs = []
    try:
        for model in a.models:
            for seed in a.seeds:
                r = run_one(model, seed, tmp, a.extra.split())
                print(f"{model} seed {seed}: test accuracy {r['test_accuracy']:.4f}, wall {r['wall_seconds']:.1f} s "
                      f"(training {r['training_seconds']:.1f} s)", flush=True)
                runs.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = []
    for model in a.models:
        rs = [r for r in runs if r["model"] == model]
        acc, acc_sd = _mean_sd([r["test_accuracy"] for r in rs])
        summary.append({"model": model, "parameters": rs[0]["parameters"], "epochs": rs[0]["epochs"],
                        "n": len(rs), "accuracy_mean": round(acc, 4), "accuracy_sd": round(acc_sd, 4),
                        "wall_mean": round(statistics.mean(r["wall_seconds"] for r in rs), 1),
                        "wall_max": max(r["wall_seconds"] for r in rs)})
    result = {"benchmark": "results_table", "seeds": a.seeds, "extra": a.extra, "runs": runs, "summary": summary,
              "published": PUBLISHED, **conditions(load_before)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results_table.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (a.out / "results_table.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
