"""Serving benchmark: the BentoML service against the hand-written baseline (bench/baseline_app.py).

Both serve the same artifact version; wrk (Debian) sends the same single-image JSON request to
`/predict` at 1, 16 and 64 connections, the two servers interleaved in every round, and the
table reports medians over rounds with the service/baseline ratio. The same run measures
`/evaluate_npz` on the 10,000 test images against in-process batched inference of the model.

    python -m bench.serving [--rounds 3] [--duration 10] [--connections 1 16 64]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.harness import ROOT, SERVICE_CMD, Server, wrk
from core import artifacts
from core.models import forward_logits, preprocess
from training.data import load_dataset

RESULTS = ROOT / "bench" / "results"


def _wrk_figures(url: str, connections: int, duration: int, body: bytes) -> dict:
    """One wrk run, the figures this benchmark keeps (socket errors summed)."""
    r = wrk(url, body, connections, duration)
    return {"requests_per_s": r["requests_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "requests": r["requests"], "non_2xx": r["non_2xx"], "socket_errors": sum(r["socket_errors"])}


def in_process_throughput(loaded, images: np.ndarray, repeats: int = 3) -> float:
    """Images/s of the model itself on the same images: preprocess + forward, all cores, the best of
    batches of 256 and 1,000 (the baseline gets the batch size that suits it, as the service does)."""
    return max(_in_process(loaded, images, b, repeats) for b in (256, 1000))


def _in_process(loaded, images: np.ndarray, batch: int, repeats: int) -> float:
    spec, tta = loaded.manifest.input, loaded.manifest.model.tta_flip
    x = torch.from_numpy(images).view(-1, *spec.shape)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                forward_logits(loaded.model, preprocess(x[i:i + batch], spec), tta).argmax(1)
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--artifacts-dir", default=os.environ.get("ARTIFACTS_DIR", "artifacts"))
    ap.add_argument("--model-name", default=os.environ.get("BENCH_MODEL") or None,
                    help="default: lenet when it has a version, else the model `make train` made (MODEL_NAME)")
    ap.add_argument("--model-version", default=os.environ.get("MODEL_VERSION") or None)
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install wrk")
    try:
        args.model_name = choose_model(args.artifacts_dir, args.model_name)
        folder = artifacts.resolve(args.artifacts_dir, args.model_name, args.model_version)
    except artifacts.ArtifactError as e:
        sys.exit(f"error: {e}")
    version = folder.name
    print(f"serving benchmark of {args.model_name}/{version}", flush=True)
    ds = load_dataset("fashion_mnist")
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    body = json.dumps({"images": [ds.test_x[0, 0].tolist()]}).encode()  # one 28x28 image
    env = {"ARTIFACTS_DIR": str(Path(args.artifacts_dir).resolve()), "MODEL_NAME": args.model_name,
           "MODEL_VERSION": version, "PYTHONPATH": str(ROOT)}
    servers = {
        "service": SERVICE_CMD,
        "baseline": [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--no-access-log",
                     "--log-level", "warning"],
    }

    def answers_predict(url: str) -> bool:  # ready means: answers the benchmark's own request with 200
        return httpx.post(url + "/predict", content=body, headers={"content-type": "application/json"},
                          timeout=2).status_code == 200

    runs: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        for target, cmd in servers.items():
            # WORKERS as the environment has it (make bench: cpu_count)
            with Server(env, workers=None, cmd=cmd, log_path=tmp / f"{target}-{rnd}.log", probe=answers_predict,
                        ready_timeout=180) as server:
                for conns in args.connections:
                    _wrk_figures(server.url + "/predict", conns, 2, body)  # warm-up, discarded
                    r = _wrk_figures(server.url + "/predict", conns, args.duration, body)
                    r.update(target=target, round=rnd, connections=conns)
                    runs.append(r)
                    print(f"round {rnd} {target:8s} c={conns:<3d} {r['requests_per_s']:8.1f} req/s "
                          f"p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms non-2xx {r['non_2xx']}", flush=True)
                if target == "service":
                    runs.extend(_evaluate_run(server.url, ds, rnd))
    loaded = artifacts.load(args.artifacts_dir, args.model_name, version)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    inproc = [in_process_throughput(loaded, ds.test_x.numpy()) for _ in range(args.rounds)]
    result = summarise(runs, inproc, args, version)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"serving-{stamp}.json").write_text(json.dumps(result, indent=2))
    chart(result, RESULTS / f"serving-{stamp}.png")
    print(table(result))
    print(f"saved {RESULTS}/serving-{stamp}.json and .png")
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def choose_model(root: str, asked: str | None) -> str:
    """The model to benchmark: the one asked for (--model-name, BENCH_MODEL), else lenet when it has a
    version (the README's figures are lenet's), else MODEL_NAME's (what `make train` made: cnn by
    default), else any model with a version."""
    if asked:
        return asked
    names = artifacts.list_names(root)
    for name in ("lenet", os.environ.get("MODEL_NAME") or "cnn", *names):
        if name in names:
            return name
    raise artifacts.ArtifactNotFound(f"no trained version under {Path(root).resolve()} to benchmark: run `make train` "
                                     "first (`make train MODEL=lenet` for the model of the README's figures)")


def _evaluate_run(base: str, ds, rnd: int, warm: int = 4, timed: int = 5) -> list[dict]:
    """/evaluate_npz images/s in steady state: the median of `timed` requests after `warm` untimed
    ones, all through one HTTP client. (A new client per request, as `httpx.post` makes, spends about
    0.1 s building its SSL context inside every timing; and a round's first requests, on freshly
    started workers, are often slower.) The warm-up rates are kept in the JSON."""
    buf = io.BytesIO()
    np.savez(buf, images=ds.test_x[:, 0].numpy(), labels=ds.test_y.numpy().astype(np.int64))
    payload = buf.getvalue()
    rates = []
    with httpx.Client(timeout=300) as client:
        for _ in range(warm + timed):
            t = time.perf_counter()
            r = client.post(base + "/evaluate_npz", files={"file": ("test.npz", payload, "application/octet-stream")})
            rates.append(10000 / (time.perf_counter() - t))
            r.raise_for_status()
    acc = r.json()["accuracy"]
    steady = statistics.median(rates[warm:])
    print(f"round {rnd} service  /evaluate_npz 10,000 images: {steady:,.0f} images/s (accuracy {acc:.4f}; "
          f"first {warm} requests {', '.join(f'{v:,.0f}' for v in rates[:warm])})", flush=True)
    return [{"target": "evaluate_npz", "round": rnd, "images_per_s": steady, "accuracy": acc,
             "warm_up_images_per_s": [round(v, 1) for v in rates[:warm]]}]


def summarise(runs: list[dict], inproc: list[float], args, version: str) -> dict:
    rows = []
    for conns in args.connections:
        row = {"connections": conns}
        for target in ("service", "baseline"):
            sel = [r for r in runs if r["target"] == target and r["connections"] == conns]
            for k in ("requests_per_s", "p50_ms", "p99_ms"):
                row[f"{target}_{k}"] = statistics.median(r[k] for r in sel)
            row[f"{target}_non_2xx"] = sum(r["non_2xx"] + r["socket_errors"] for r in sel)
        row["rps_ratio"] = row["service_requests_per_s"] / row["baseline_requests_per_s"]
        row["p99_ratio"] = row["service_p99_ms"] / row["baseline_p99_ms"]
        rows.append(row)
    ev = [r["images_per_s"] for r in runs if r["target"] == "evaluate_npz"]
    evaluate = {"service_images_per_s": statistics.median(ev) if ev else None,
                "in_process_images_per_s": statistics.median(inproc)}
    if ev:
        evaluate["ratio"] = evaluate["service_images_per_s"] / evaluate["in_process_images_per_s"]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}",
            "model": args.model_name, "version": version, "rounds": args.rounds, "duration_s": args.duration,
            "rows": rows, "evaluate": evaluate, "runs": runs}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def table(res: dict) -> str:
    lines = [f"serving benchmark, {res['model']} {res['version']}, medians of {res['rounds']} interleaved rounds "
             f"x {res['duration_s']} s, {res['machine']}, {res['date']}",
             "| conns | service req/s | baseline req/s | ratio | service p50 / p99 ms | baseline p50 / p99 ms | "
             "p99 ratio | non-2xx (service / baseline) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['connections']} | {r['service_requests_per_s']:,.0f} | "
                     f"{r['baseline_requests_per_s']:,.0f} | "
                     f"{r['rps_ratio']:.2f} | {r['service_p50_ms']:.1f} / {r['service_p99_ms']:.1f} | "
                     f"{r['baseline_p50_ms']:.1f} / {r['baseline_p99_ms']:.1f} | {r['p99_ratio']:.2f} | "
                     f"{r['service_non_2xx']} / {r['baseline_non_2xx']} |")
    ev = res["evaluate"]
    if ev.get("service_images_per_s"):
        lines.append(f"\n/evaluate_npz on 10,000 test images: {ev['service_images_per_s']:,.0f} images/s; in-process "
                     f"batched inference {ev['in_process_images_per_s']:,.0f} images/s; ratio {ev['ratio']:.2f}")
    return "\n".join(lines)


def chart(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conns = [r["connections"] for r in res["rows"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    w = 0.38
    xs = np.arange(len(conns))
    for i, t in enumerate(("service", "baseline")):
        a1.bar(xs + (i - 0.5) * w, [r[f"{t}_requests_per_s"] for r in res["rows"]], w, label=t)
        a2.bar(xs + (i - 0.5) * w, [r[f"{t}_p99_ms"] for r in res["rows"]], w, label=t)
    for ax, title in ((a1, "requests/s (median)"), (a2, "p99 latency ms (median)")):
        ax.set_xticks(xs, [f"{c} conn" for c in conns])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{res['model']} single-image /predict, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
