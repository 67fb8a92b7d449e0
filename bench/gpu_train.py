"""GPU training runs: the best Fashion-MNIST model per GPU-second, measured on a machine with CUDA.

    make gpu-bundle                      # here: the four Fashion-MNIST .gz files into gpu-bundle/ (ignored)
    DATA_DIR=gpu-bundle/fashion-mnist python3 -m bench.gpu_train --out $OUT/gpu_train.json    # there

Each run is its own `python -m training train --model M --seed S --device cuda` command (what a user
types: start-up, data loading, CUDA initialisation and publishing included) into a temporary
artifacts folder: the default `cnn` preset with seed 0, then the `resnet` preset with seeds 0, 1, 2.
Before them, two quick checks on the device:

  host_syncs   one resnet epoch on 8,192 images under torch.cuda's sync debug mode, counting the calls
               that make the host wait for the GPU: with the generator on the device (this code) and with
               a CPU generator (how augmentation drew before: a blocking copy per random tensor)
  determinism  the resnet preset with --deterministic, 1 epoch on 4,096 images, twice: same weights hash?

Prints one JSON object on stdout (progress goes to stderr) and writes it to --out after every run, so
a run cut short still leaves what it measured; the table rows go beside it (.md). A check or a run that
fails is recorded in the JSON and the rest still run (exit status 1 if a run failed). Targets: resnet mean
test accuracy >= 0.950 over 3 seeds with every run's training <= 60 s; cnn <= 5 s at >= 0.930.
"Training seconds" is the manifest's `training_seconds` (what `python -m training train` prints as
"trained in": from the start of the run through data loading, every epoch and its validation, to
before the test evaluation); `loop_seconds` is the sum of the epochs' training loops alone.

    python -m bench.gpu_train --render FILE     # the table rows from a JSON this script wrote (no GPU needed)
    python -m bench.gpu_train --device cpu --dry-run --skip-checks   # tests this script on a CPU in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from core import artifacts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DRY_RUN = {"epochs": 1, "limit_train": 512, "limit_test": 256}
# model -> (mean test accuracy at least, training seconds at most for every run)
TARGETS = {"resnet": (0.950, 60.0), "cnn": (0.930, 5.0)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_command(model: str, seed: int, device: str, artifacts_dir: str, limits: dict, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "training", "train", "--model", model, "--seed", str(seed), "--device", device,
           "--artifacts-dir", artifacts_dir]
    for k, v in limits.items():
        if v is not None:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd + extra


def run_one(cmd: list[str]) -> dict:
    """One training command, timed as a whole; the numbers come from the version's manifest."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[1:])} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    folder = Path(ROOT, re.search(r"^published (.+)$", proc.stdout, re.M).group(1).strip())
    m = artifacts.read_manifest(folder)
    hist, tr = m.training.history, m.training
    return {"model": m.model.arch, "seed": tr.seed, "device": tr.device,
            "parameters": m.model.parameters, "epochs": len(hist),
            "training_seconds": tr.training_seconds, "loop_seconds": round(sum(h["seconds"] for h in hist), 2),
            "wall_seconds": round(wall, 1), "test_accuracy": m.metrics.test_accuracy, "test_images": m.dataset.test,
            "test_is_full_official_set": m.dataset.test_is_full_official_set,
            "images_per_s_last_epoch": hist[-1]["images_per_s"], "weights_sha256": m.weights_sha256,
            "tta_flip": m.model.tta_flip, "kwargs": m.model.kwargs,
            "command": "python -m training " + shlex.join(cmd[3:])}


def summarise(runs: list[dict], preset_runs: bool) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == model]
        accs = [r["test_accuracy"] for r in rs]
        secs = [r["training_seconds"] for r in rs]
        s = {"model": model, "n": len(rs), "seeds": [r["seed"] for r in rs], "parameters": rs[0]["parameters"],
             "epochs": rs[0]["epochs"], "accuracy_mean": round(statistics.mean(accs), 4),
             "accuracy_sd": round(statistics.stdev(accs), 4) if len(rs) > 1 else None,
             "training_seconds_mean": round(statistics.mean(secs), 1), "training_seconds_max": max(secs),
             "loop_seconds_mean": round(statistics.mean(r["loop_seconds"] for r in rs), 1),
             "wall_mean": round(statistics.mean(r["wall_seconds"] for r in rs), 1),
             "wall_max": max(r["wall_seconds"] for r in rs)}
        if model in TARGETS:
            acc, sec = TARGETS[model]
            # a target is judged only on the preset's own run over the full test set
            full = preset_runs and all(r["test_is_full_official_set"] for r in rs)
            s["target"] = {"accuracy_mean_at_least": acc, "training_seconds_at_most": sec,
                           "met": (s["accuracy_mean"] >= acc and s["training_seconds_max"] <= sec) if full else None}
        out.append(s)
    return out


def host_sync_check(limit_train: int = 8192) -> dict:
    """Host syncs in one resnet training epoch (after a warm-up epoch), counted by torch.cuda's sync
    debug mode, with the data generator on the GPU (this code) and on the CPU (as before)."""
    from training.config import make_config
    from training.engine import train_one_epoch
    from training.pipeline import prepare

    out = {"limit_train": limit_train}
    for label, on_device in (("device_generator", True), ("cpu_generator", False)):
        cfg = make_config(model="resnet", device="cuda", limit_train=limit_train, epochs=1, checkpoint=False)
        _, device, train, _, _, model, crit, opt, sched, _, _ = prepare(cfg)
        gen = torch.Generator(device=device if on_device else "cpu").manual_seed(cfg.seed)
        args = (model, crit, opt, sched, train, cfg.batch_size, gen, cfg.augment)
        train_one_epoch(*args, erase=cfg.random_erase)  # warm-up: cuDNN/cuBLAS set-up may sync once
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(*args, erase=cfg.random_erase)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        out[label] = {"steps": -(-len(train) // cfg.batch_size), "host_syncs": len(syncs)}
    return out


def determinism_check(device: str, extra: list[str], limits: dict) -> dict:
    """The resnet preset with --deterministic, twice: the same weights hash, or the error it raised."""
    limits = {"epochs": 1, "limit_train": min(limits.get("limit_train") or 4096, 4096),
              "limit_test": min(limits.get("limit_test") or 1000, 1000)}
    hashes = []
    with tempfile.TemporaryDirectory(prefix="gpu-train-det-") as tmp:
        for _ in range(2):
            cmd = train_command("resnet", 0, device, tmp, limits, ["--deterministic", "--no-checkpoint", *extra])
            try:
                hashes.append(run_one(cmd)["weights_sha256"])
            except RuntimeError as e:
                return {"same_weights": None, "error": str(e).splitlines()[-1][:500], **limits}
    return {"same_weights": hashes[0] == hashes[1], "weights_sha256": hashes, **limits}


def markdown(result: dict) -> str:
    lines = [("| model | device | parameters | epochs | training s (mean, max) | loop s (mean) | wall s (mean, max) "
              "| test accuracy (mean ± sd) | runs | target met |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        sd = f" ± {s['accuracy_sd']:.4f}" if s["accuracy_sd"] is not None else ""
        t = s.get("target")
        met = "" if t is None else {True: "yes", False: "no", None: "not judged (not the preset's run)"}[t["met"]]
        if t is not None:
            met += f" (≥ {t['accuracy_mean_at_least']:.3f} in ≤ {t['training_seconds_at_most']:g} s)"
        lines.append(f"| {s['model']} (this repo) | {result['gpu'] or result['device']} | {s['parameters']:,} | "
                     f"{s['epochs']} | {s['training_seconds_mean']:.1f}, {s['training_seconds_max']:.1f} | "
                     f"{s['loop_seconds_mean']:.1f} | {s['wall_mean']:.0f}, {s['wall_max']:.0f} | "
                     f"{s['accuracy_mean']:.4f}{sd} | {s['n']} seed{'s' if s['n'] > 1 else ''} | {met} |")
    checks = result.get("checks", {})
    notes = [(f"\nMeasured {result['created_at']} with `{result['command']}`; torch {result['torch']}, "
              f"{result['gpu'] or 'no GPU'}.")]
    hs = checks.get("host_syncs")
    if hs and "device_generator" in hs:
        notes.append(f"Host syncs in one resnet epoch of {hs['limit_train']:,} images "
                     f"({hs['device_generator']['steps']} steps): {hs['device_generator']['host_syncs']} with the "
                     f"generator on the GPU, {hs['cpu_generator']['host_syncs']} with a CPU generator.")
    elif hs:
        notes.append(f"Host-sync check failed: {hs['error']}.")
    det = checks.get("determinism")
    if det:
        notes.append("--deterministic, twice: " + (f"same weights: {det['same_weights']}" if det.get("same_weights")
                     is not None else f"failed: {det['error']}") + ".")
    for f in result.get("failed", []):
        notes.append(f"FAILED: {f['model']} seed {f['seed']}: {f['error'].splitlines()[-1][:200]}.")
    return "\n".join(lines) + "\n" + " ".join(notes)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["summary"]:
        out.with_suffix(".md").write_text(markdown(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only to test this script")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of the resnet preset")
    p.add_argument("--cnn-seeds", nargs="*", type=int, default=[0], help="seeds of the default cnn preset")
    p.add_argument("--epochs", type=int, help="override every preset's epochs (then no target is judged)")
    p.add_argument("--limit-train", type=int, help="train on the first N images (tiny runs)")
    p.add_argument("--limit-test", type=int, help="test on the first N images (tiny runs)")
    p.add_argument("--extra", default="", help="more flags for every training command, e.g. '--no-checkpoint'")
    p.add_argument("--dry-run", action="store_true",
                   help=f"tiny runs: {', '.join(f'{k}={v}' for k, v in DRY_RUN.items())}, one seed each")
    p.add_argument("--skip-checks", action="store_true", help="skip the host-sync and determinism checks")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_train.json", help="the JSON (and .md beside it)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only print the table rows of a JSON this wrote")
    a = p.parse_args(argv)

    if a.render:
        result = json.loads(a.render.read_text())
        text = markdown(result)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".md").write_text(text + "\n")
        print(text)
        return 0
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: bench.gpu_train needs a CUDA GPU and torch {torch.__version__} sees none; run it on the "
              "device machine (--device cpu --dry-run only tests the script)", file=sys.stderr)
        return 2
    if not (a.device.startswith("cuda") or a.device == "cpu"):
        print(f"error: unknown device {a.device!r}; use cuda, cuda:N or cpu", file=sys.stderr)
        return 2

    limits = {"epochs": a.epochs, "limit_train": a.limit_train, "limit_test": a.limit_test}
    seeds, cnn_seeds = a.seeds, a.cnn_seeds
    if a.dry_run:
        limits = {k: v if v is not None else DRY_RUN[k] for k, v in limits.items()}
        seeds, cnn_seeds = seeds[:1], cnn_seeds[:1]
    extra = shlex.split(a.extra)
    preset_runs = all(v is None for v in limits.values()) and not extra
    cuda = a.device.startswith("cuda")
    args_text = shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "gpu_train", "command": f"python -m bench.gpu_train {args_text}".strip(),
              "device": a.device, "gpu": torch.cuda.get_device_name(a.device) if cuda else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
              "data_dir": os.environ.get("DATA_DIR"), "settings": {**limits, "extra": a.extra},
              "preset_runs": preset_runs, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "checks": {}, "runs": [], "failed": [], "summary": []}
    try:
        import torchvision
        result["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    started = time.perf_counter()
    # one session on the device machine may be all there is: a failed check or run is recorded, not fatal
    checks = [] if a.skip_checks else [("determinism", lambda: determinism_check(a.device, extra, limits))]
    if cuda and not a.skip_checks:
        checks.insert(0, ("host_syncs", host_sync_check))
    for name, check in checks:
        try:
            result["checks"][name] = check()
        except Exception as e:  # noqa: BLE001 - reported in the JSON, the runs still go ahead
            result["checks"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            if cuda:
                torch.cuda.empty_cache()  # the in-process check's memory, before the training commands
        log(f"{name}: {json.dumps(result['checks'][name])}")
        write(result, a.out)
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        for model, model_seeds in (("cnn", cnn_seeds), ("resnet", seeds)):
            for seed in model_seeds:
                try:
                    r = run_one(train_command(model, seed, a.device, tmp, limits, extra))
                except RuntimeError as e:
                    result["failed"].append({"model": model, "seed": seed, "error": str(e)[-1500:]})
                    log(f"{model} seed {seed}: FAILED: {str(e)[-500:]}")
                    write(result, a.out)
                    continue
                log(f"{model} seed {seed}: test accuracy {r['test_accuracy']:.4f}, training "
                    f"{r['training_seconds']:.1f} s (loop {r['loop_seconds']:.1f} s), wall {r['wall_seconds']:.1f} s")
                result["runs"].append(r)
                result["summary"] = summarise(result["runs"], preset_runs)
                write(result, a.out)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    write(result, a.out)
    if result["summary"]:
        log(markdown(result))
    print(json.dumps(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
