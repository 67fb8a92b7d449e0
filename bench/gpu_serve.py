"""The device check of serving (issue 11): the real `bentoml serve` with DEVICE=cuda and default settings
(WORKERS unset: WORKERS_PER_GPU per GPU), against DEVICE=cpu with its default workers on the same host.

    python3 -m bench.gpu_serve --artifacts-dir DIR [--model-name cnn] [--connections 64 256] [--seconds 15]

For each device: a closed-loop load of single-image /predict at each connection count, then a 10,000-image
/evaluate_npz (best of 3). Prints one JSON object. The device machine has no wrk, so the load comes from
this file's own generator: several processes, each with asyncio keep-alive connections speaking plain
HTTP/1.1. When no version of the model is under --artifacts-dir, one is trained first (on the GPU when
one is visible). Runs on a CPU-only host too (`--devices cpu`, small --connections and --seconds), which
is how tests/test_scale.py checks it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections import Counter

import httpx
import numpy as np

from bench.harness import ROOT, Server

BENTOML_CMD = [sys.executable, "-m", "bentoml", "serve", "service.service:ImageClassifier", "--working-dir", str(ROOT)]


# --- the load generator -------------------------------------------------------------------

async def _connection(host: str, port: int, request: bytes, until: float, latencies: list, codes: Counter) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            t = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t)
            codes[status] += 1
    except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
        codes["connection_error"] += 1
    finally:
        writer.close()


def _load_process(args: tuple) -> tuple[list, dict]:
    host, port, path, body, connections, seconds = args
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list = []
    codes: Counter = Counter()

    async def run():
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_connection(host, port, request, until, latencies, codes) for _ in range(connections)))

    asyncio.run(run())
    return latencies, dict(codes)


def load(url: str, path: str, body: bytes, connections: int, seconds: float, processes: int) -> dict:
    """`connections` keep-alive connections over `processes` processes, each POSTing `body` for `seconds`."""
    host, port = url.removeprefix("http://").split(":")
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:  # each process times its own `seconds`
        parts = pool.map(_load_process, [(host, int(port), path, body, n, seconds) for n in shares])
    latencies = sorted(x for lat, _ in parts for x in lat)
    codes: Counter = Counter()
    for _, c in parts:
        codes.update(c)
    ok = sum(n for code, n in codes.items() if isinstance(code, int) and 200 <= code < 300)
    return {"connections": connections, "seconds": seconds, "requests": len(latencies),
            "requests_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
            "non_2xx": sum(codes.values()) - ok - codes.get("connection_error", 0),
            "statuses": {str(k): v for k, v in sorted(codes.items(), key=str)}}


# --- one device ---------------------------------------------------------------------------

def _npz(info: dict, n: int) -> bytes:
    shape = info["input"]
    rng = np.random.default_rng(0)
    size = (n, shape["height"], shape["width"]) if shape["channels"] == 1 else (
        n, shape["channels"], shape["height"], shape["width"])
    buf = io.BytesIO()
    np.savez(buf, images=rng.integers(0, 256, size, dtype=np.uint8),
             labels=rng.integers(0, len(info["classes"]), n))
    return buf.getvalue()


def measure(device: str, env: dict, args) -> dict:
    with Server({**env, "DEVICE": device}, workers=None, cmd=BENTOML_CMD, ready_timeout=args.ready_timeout) as s:
        info = httpx.get(s.url + "/model_info", timeout=60).json()
        shape = info["input"]
        image = np.zeros((shape["height"], shape["width"]) if shape["channels"] == 1 else
                         (shape["channels"], shape["height"], shape["width"]), dtype=int).tolist()
        body = json.dumps({"images": [image]}).encode()
        load(s.url, "/predict", body, min(args.connections), min(2.0, args.seconds), args.processes)  # warm-up
        rows = [load(s.url, "/predict", body, c, args.seconds, args.processes) for c in args.connections]
        npz, times = _npz(info, args.npz_images), []
        for _ in range(3):
            t = time.perf_counter()
            r = httpx.post(s.url + "/evaluate_npz", files={"file": ("x.npz", npz)}, timeout=300)
            times.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"/evaluate_npz answered {r.status_code}: {r.text[:300]}")
        return {"device": info["device"], "workers": info["limits"]["workers"], "model": info["name"],
                "version": info["model_version"], "load": rows,
                f"evaluate_npz_{args.npz_images}_s": {"best": round(min(times), 3),
                                                      "median": round(statistics.median(times), 3)}}


def ensure_version(root: str, name: str) -> None:
    """Train the model once when no version of it is there (on the GPU when one is visible)."""
    from core import artifacts

    if os.path.isdir(os.path.join(root, name)) and artifacts.list_versions(root, name):
        return
    from training.config import make_config
    from training.pipeline import train

    train(make_config(model=name, artifacts_dir=root), log=lambda *_: None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts-dir", required=True)
    ap.add_argument("--model-name", default="cnn")
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    ap.add_argument("--connections", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--npz-images", type=int, default=10_000)
    ap.add_argument("--ready-timeout", type=float, default=600)
    args = ap.parse_args(argv)
    ensure_version(args.artifacts_dir, args.model_name)
    env = {"ARTIFACTS_DIR": args.artifacts_dir, "MODEL_NAME": args.model_name, "MODEL_VERSION": ""}
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "load_processes": args.processes}
    try:
        import torch
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        out["gpu"] = None
    for device in args.devices:
        out[device] = measure(device, env, args)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
