"""The server a user would write by hand, made as fast as such an app gets: Starlette + torch, ~30 lines,
no validation, no metrics, one torch thread, and gc.freeze() after the model is loaded (so full
collections never scan the framework and the weights: the same remedy the service applies).

Serves the same artifact version with the same request and answer shape as the service's /predict,
so the benchmark compares like with like. Run as one process or as N:
    python -m bench.baseline_app --port 8000 [--processes N]
(ARTIFACTS_DIR, MODEL_NAME, MODEL_VERSION as for the service). N processes each bind the port with
SO_REUSEPORT (the kernel spreads connections over them). Not `uvicorn --workers N`: its shared socket
is created without IPPROTO_TCP, so asyncio never sets TCP_NODELAY on its connections, and Nagle's
algorithm against delayed ACKs held every response ~45 ms (21 req/s at one connection, measured here).
"""

import argparse
import gc
import os
import socket
import subprocess
import sys

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.artifacts import load
from core.models import forward_logits, preprocess, probabilities

torch.set_num_threads(1)
_m = load(os.environ.get("ARTIFACTS_DIR", "artifacts"), os.environ.get("MODEL_NAME", "lenet"),
          os.environ.get("MODEL_VERSION") or None)
_classes, _spec, _tta = list(_m.manifest.classes), _m.manifest.input, _m.manifest.model.tta_flip


async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    x = torch.tensor(body["images"], dtype=torch.float32)  # (N, H, W)
    x = preprocess(x.view(x.shape[0], *_spec.shape), _spec)
    with torch.inference_mode():
        probs = probabilities(forward_logits(_m.model, x, _tta), _m.manifest.metrics.calibration.temperature)
    p, idx = probs.max(1)
    return JSONResponse({"model_version": _m.version, "predictions": [
        {"label": int(i), "class_name": _classes[int(i)], "probability": float(q)} for q, i in zip(p, idx)]})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
gc.collect()
gc.freeze()  # everything loaded so far stays out of the collector's reach


def serve(host: str, port: int, processes: int) -> None:
    """`processes` uvicorn servers of `app` on one port: this one and processes - 1 children."""
    import uvicorn

    children = [subprocess.Popen([sys.executable, "-m", "bench.baseline_app", "--host", host, "--port", str(port)])
                for _ in range(processes - 1)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio sets NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        for child in children:
            child.terminate()
            child.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the hand-written baseline server of bench/serving.py")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--processes", type=int, default=1)
    args = ap.parse_args()
    serve(args.host, args.port, args.processes)
