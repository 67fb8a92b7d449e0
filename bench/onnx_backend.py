"""Would an onnxruntime backend serve faster than torch on this CPU? Same version, same computation.

    python -m bench.onnx_backend [--models lenet cnn] [--rounds 7] [--seconds 1] [--batches 1 256]

torch   what a service worker runs per pass (service.inference.Classifier._pass): core.models.preprocess,
        forward_logits with the manifest's tta_flip, softmax, under inference_mode; 1 intra-op thread
        (the service's TORCH_THREADS default)
onnx    onnxruntime on the version's model.onnx (exported on the fly for a version that predates it),
        1 intra-op thread, sequential execution, every graph optimisation

Both take the same uint8 test images and answer softmax probabilities (their largest difference is
printed). In-process, one thread each, at batch 1 (a single-image /predict) and 256 (an /evaluate
pass). Every round measures each (model, batch, backend) for --seconds after a warm-up call, the
order reversed every other round, so a burst of load from elsewhere hits both; the table gives
medians over rounds. Results: bench/results/onnx_backend.json (and a time-stamped copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from core import artifacts
from core.models import forward_logits, preprocess

RESULTS = Path(__file__).parent / "results"


def torch_backend(loaded):
    spec, tta, model = loaded.manifest.input, loaded.manifest.model.tta_flip, loaded.model

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return forward_logits(model, preprocess(torch.from_numpy(images), spec), tta).softmax(1).numpy()
    return run


def onnx_backend(loaded):
    import onnxruntime as ort

    from training.export import export_onnx

    m = loaded.manifest
    src = str(loaded.folder / m.onnx) if m.onnx else export_onnx(loaded.model.state_dict(), m)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> np.ndarray:
        return sess.run(["probabilities"], {"pixels": images})[0]
    return run


def seconds_per_call(fn, images: np.ndarray, seconds: float) -> float:
    fn(images)  # warm-up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(images)
        calls += 1
    return elapsed / calls


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.onnx_backend", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet", "cnn"], help="model names (their champion, else newest)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0, help="measured time per (model, batch, backend) per round")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--artifacts-dir", default=os.environ.get("ARTIFACTS_DIR", "artifacts"))
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (default bench/results)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args) -> dict:
    from training.data import DataNotFound

    loaded, backends, images = {}, {}, {}
    for name in args.models:
        try:
            loaded[name] = artifacts.load(args.artifacts_dir, name)
            images[name] = _test_images(loaded[name].manifest, max(args.batches))
        except (artifacts.ArtifactError, DataNotFound) as e:
            sys.exit(f"error: {e}" + ("" if name == "cnn" else f"; `make train MODEL={name}` makes one"))
        backends[name] = {"torch": torch_backend(loaded[name]), "onnx": onnx_backend(loaded[name])}
        diff = np.abs(backends[name]["torch"](images[name]) - backends[name]["onnx"](images[name])).max()
        print(f"{name} {loaded[name].version}: largest probability difference torch vs onnx {diff:.2e}", flush=True)
    cases = [(n, b, k) for n in args.models for b in args.batches for k in ("torch", "onnx")]
    runs = []
    for rnd in range(1, args.rounds + 1):
        for name, batch, backend in (cases if rnd % 2 else cases[::-1]):
            s = seconds_per_call(backends[name][backend], images[name][:batch], args.seconds)
            runs.append({"round": rnd, "model": name, "batch": batch, "backend": backend, "seconds_per_call": s})
    rows = []
    for name in args.models:
        for batch in args.batches:
            med = {k: statistics.median(r["seconds_per_call"] for r in runs
                                        if (r["model"], r["batch"], r["backend"]) == (name, batch, k))
                   for k in ("torch", "onnx")}
            rows.append({"model": name, "version": loaded[name].version,
                         "tta_flip": loaded[name].manifest.model.tta_flip,
                         "batch": batch, "torch_ms": med["torch"] * 1e3, "onnx_ms": med["onnx"] * 1e3,
                         "torch_images_per_s": batch / med["torch"], "onnx_images_per_s": batch / med["onnx"],
                         "onnx_speedup": med["torch"] / med["onnx"]})
    import onnxruntime

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}",
              "load_average": os.getloadavg(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "threads": 1, "rounds": args.rounds, "seconds": args.seconds, "rows": rows, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    (args.out / "onnx_backend.json").write_text(text)
    (args.out / f"onnx_backend-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    print(table(result))
    print(f"saved {args.out}/onnx_backend.json")
    return result


def _test_images(manifest, n: int) -> np.ndarray:
    """The first n official test images of the version's dataset (uint8 (n, C, H, W))."""
    from training.data import load_dataset

    source = manifest.dataset.source
    ds = load_dataset(manifest.dataset.name, source if Path(source).is_dir() else None)
    x = ds.test_x[:n].numpy()
    return np.ascontiguousarray(np.concatenate([x] * -(-n // len(x)))[:n])


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def table(res: dict) -> str:
    lines = [f"torch vs onnxruntime, in-process, 1 thread, medians of {res['rounds']} interleaved rounds x "
             f"{res['seconds']} s, {res['machine']}, load average {res['load_average'][0]:.1f}, {res['date']}",
             "| model | batch | torch ms/call | onnx ms/call | torch images/s | onnx images/s | onnx speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']}{' (tta)' if r['tta_flip'] else ''} | {r['batch']} | {r['torch_ms']:.3f} | "
                     f"{r['onnx_ms']:.3f} | {r['torch_images_per_s']:,.0f} | {r['onnx_images_per_s']:,.0f} | "
                     f"{r['onnx_speedup']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
