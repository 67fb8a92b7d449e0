"""Serving benchmark: the BentoML service against the hand-written baseline (bench/baseline_app.py).

The baseline runs twice: as one process, and as as many processes as the service has workers
(uvicorn --workers N); at each connection count the faster of the two is the one compared with.
All serve the same artifact version side by side; wrk (Debian) sends the same single-image JSON
request to `/predict` at 1, 16, 64 and 256 connections, every server in every round (their order
rotated), and the table reports medians over rounds, the worker count and settings of each side,
and the service/baseline ratios (medians of per-round ratios). The same run measures
`/evaluate_npz` on the 10,000 test images against in-process batched inference of the model.

    python -m bench.serving [--rounds 3] [--duration 10] [--connections 1 16 64 256]
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

from bench.harness import ROOT, SERVICE_CMD, Server, running, wrk
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
    ap.add_argument("--warmup", type=int, default=2, help="seconds of untimed load before each wrk run")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--evaluate-requests", type=int, default=5,
                    help="timed /evaluate_npz requests per round (after as many untimed ones, at most 4; 0: none)")
    ap.add_argument("--artifacts-dir", default=os.environ.get("ARTIFACTS_DIR", "artifacts"))
    ap.add_argument("--model-name", default=os.environ.get("BENCH_MODEL") or None,
                    help="default: lenet when it has a version, else the model `make train` made (MODEL_NAME)")
    ap.add_argument("--model-version", default=os.environ.get("MODEL_VERSION") or None)
    ap.add_argument("--results-dir", default=str(RESULTS))
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

    def answers_predict(url: str) -> bool:  # ready means: answers the benchmark's own request with 200
        return httpx.post(url + "/predict", content=body, headers={"content-type": "application/json"},
                          timeout=2).status_code == 200

    def start(name: str, cmd: list[str]) -> Server:  # WORKERS as the environment has it (make bench: cpu_count)
        return Server(env, workers=None, cmd=cmd, log_path=tmp / f"{name}.log", probe=answers_predict,
                      ready_timeout=180)

    runs: list[dict] = []
    # All servers run side by side for the whole benchmark, so that every round measures each of them
    # at each connection count within seconds of the others (the machine is shared and noisy).
    with running(start("service", SERVICE_CMD)) as (service,):
        sides = {"service": service_side(service)}
        n = sides["service"]["workers"]
        procs = sorted({1, n})
        baselines = {f"baseline_{p}p": start(f"baseline-{p}", baseline_cmd(p)) for p in procs}
        with running(*baselines.values()):
            servers = {"service": service, **baselines}
            sides.update({name: baseline_side(p) for name, p in zip(baselines, procs)})
            for rnd in range(1, args.rounds + 1):
                runs.extend(_round(servers, rnd, args, body))
                if args.evaluate_requests:
                    runs.extend(_evaluate_run(service.url, ds, rnd, min(4, args.evaluate_requests),
                                              args.evaluate_requests))
    loaded = artifacts.load(args.artifacts_dir, args.model_name, version)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    inproc = [in_process_throughput(loaded, ds.test_x.numpy()) for _ in range(args.rounds)]
    result = summarise(runs, inproc, args, version, sides)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"serving-{stamp}.json").write_text(json.dumps(result, indent=2))
    chart(result, results / f"serving-{stamp}.png")
    print(table(result))
    print(f"saved {results}/serving-{stamp}.json and .png")
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def baseline_cmd(processes: int) -> list[str]:
    """bench/baseline_app.py: one uvicorn process, or `processes` of them on one port (SO_REUSEPORT)."""
    return [sys.executable, "-m", "bench.baseline_app", "--processes", str(processes)]


def _uvicorn_stack() -> str:
    """What uvicorn's defaults pick in this environment (both sides run uvicorn with them)."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn {http}/{loop}"


def service_side(server: Server) -> dict:
    """The service's worker processes (counted, not assumed) and the limits it reports in /model_info."""
    import psutil

    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
    info = httpx.get(server.url + "/model_info", timeout=30).json()
    limits = info.get("limits", {})
    shown = ", ".join(f"{k}={v}" for k, v in limits.items() if k in ("max_concurrency", "request_timeout_s"))
    torch_threads = os.environ.get("TORCH_THREADS", "1")
    return {"workers": len(workers), "device": info.get("device"), "limits": limits,
            "settings": f"bentoml serve ({_uvicorn_stack()}), WORKERS={os.environ.get('WORKERS', 'cpu_count')} "
                        f"-> {len(workers)} worker processes, {torch_threads} torch thread each, {shown}"}


def baseline_side(processes: int) -> dict:
    how = "1 process" if processes == 1 else f"{processes} processes on one port (SO_REUSEPORT)"
    return {"workers": processes, "settings": f"Starlette + torch ({_uvicorn_stack()}), {how}, 1 torch thread "
                                               "each, gc.freeze() after load"}


def _round(servers: dict[str, Server], rnd: int, args, body: bytes) -> list[dict]:
    """One round: every server at every connection count, the servers' order rotated from round to round."""
    names = list(servers)
    out = []
    for conns in args.connections:
        k = (rnd - 1) % len(names)
        for target in names[k:] + names[:k]:
            url = servers[target].url + "/predict"
            if args.warmup:
                _wrk_figures(url, conns, args.warmup, body)  # discarded
            r = _wrk_figures(url, conns, args.duration, body)
            r.update(target=target, round=rnd, connections=conns)
            out.append(r)
            print(f"round {rnd} {target:12s} c={conns:<3d} {r['requests_per_s']:8.1f} req/s "
                  f"p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms non-2xx {r['non_2xx']}", flush=True)
    return out


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


def summarise(runs: list[dict], inproc: list[float], args, version: str, sides: dict) -> dict:
    """Medians over rounds per server and connection count. At each connection count the baseline is the
    faster of the hand-written servers (by median req/s); the ratios are medians of the per-round ratios
    against it (each round measures both within seconds of each other)."""
    targets = list(sides)
    rows = []
    for conns in args.connections:
        row: dict = {"connections": conns}
        by_target = {t: {r["round"]: r for r in runs if r["target"] == t and r["connections"] == conns}
                     for t in targets}
        for t, sel in by_target.items():
            for k in ("requests_per_s", "p50_ms", "p99_ms"):
                row[f"{t}_{k}"] = statistics.median(r[k] for r in sel.values())
            row[f"{t}_non_2xx"] = sum(r["non_2xx"] + r["socket_errors"] for r in sel.values())
        best = max((t for t in targets if t != "service"), key=lambda t: row[f"{t}_requests_per_s"])
        row["baseline"] = best
        for k in ("requests_per_s", "p50_ms", "p99_ms", "non_2xx"):
            row[f"baseline_{k}"] = row[f"{best}_{k}"]
        service, base = by_target["service"], by_target[best]
        common = sorted(set(service) & set(base))
        row["rps_ratio"] = statistics.median(service[r]["requests_per_s"] / base[r]["requests_per_s"] for r in common)
        row["p99_ratio"] = statistics.median(service[r]["p99_ms"] / base[r]["p99_ms"] for r in common)
        rows.append(row)
    ev = [r["images_per_s"] for r in runs if r["target"] == "evaluate_npz"]
    evaluate = {"service_images_per_s": statistics.median(ev) if ev else None,
                "in_process_images_per_s": statistics.median(inproc)}
    if ev:
        evaluate["ratio"] = evaluate["service_images_per_s"] / evaluate["in_process_images_per_s"]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}",
            "model": args.model_name, "version": version, "rounds": args.rounds, "duration_s": args.duration,
            "command": command(args, version),
            "sides": sides, "rows": rows, "evaluate": evaluate, "runs": runs}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def command(args, version: str) -> str:
    """The command line that repeats this run."""
    return (f"python -m bench.serving --rounds {args.rounds} --duration {args.duration} --warmup {args.warmup} "
            f"--connections {' '.join(map(str, args.connections))} --evaluate-requests {args.evaluate_requests} "
            f"--model-name {args.model_name} --model-version {version}")


def _label(target: str, sides: dict) -> str:
    return "service" if target == "service" else f"baseline {sides[target]['workers']}p"


def table(res: dict) -> str:
    sides = res["sides"]
    bases = [t for t in sides if t != "service"]
    lines = [f"serving benchmark, {res['model']} {res['version']}, medians of {res['rounds']} interleaved rounds "
             f"x {res['duration_s']} s, {res['machine']}, {res['date']}",
             f"command: {res['command']}",
             *(f"{_label(t, sides)}: {sides[t]['settings']}" for t in sides),
             "ratio, p99 ratio: service / the faster baseline at that connection count (medians of per-round ratios)",
             "| conns | service req/s | " + " | ".join(f"{_label(t, sides)} req/s" for t in bases) +
             " | ratio | service p50 / p99 ms | faster baseline p50 / p99 ms | p99 ratio | non-2xx (service / " +
             " / ".join(_label(t, sides) for t in bases) + ") |",
             "|---" * (8 + len(bases) - 1) + "|"]
    for r in res["rows"]:
        lines.append(f"| {r['connections']} | {r['service_requests_per_s']:,.0f} | " +
                     " | ".join(f"{r[f'{t}_requests_per_s']:,.0f}" for t in bases) +
                     f" | {r['rps_ratio']:.2f} | {r['service_p50_ms']:.1f} / {r['service_p99_ms']:.1f} | "
                     f"{r['baseline_p50_ms']:.1f} / {r['baseline_p99_ms']:.1f} ({_label(r['baseline'], sides)}) | "
                     f"{r['p99_ratio']:.2f} | {r['service_non_2xx']} / " +
                     " / ".join(str(r[f"{t}_non_2xx"]) for t in bases) + " |")
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
    targets = list(res["sides"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    w = 0.8 / len(targets)
    xs = np.arange(len(conns))
    for i, t in enumerate(targets):
        off = (i - (len(targets) - 1) / 2) * w
        a1.bar(xs + off, [r[f"{t}_requests_per_s"] for r in res["rows"]], w, label=_label(t, res["sides"]))
        a2.bar(xs + off, [r[f"{t}_p99_ms"] for r in res["rows"]], w, label=_label(t, res["sides"]))
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
