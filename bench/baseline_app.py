"""The server a user would write by hand: Starlette + torch, ~30 lines, no validation, no metrics.

Serves the same artifact version with the same request and answer shape as the service's
/predict, so the benchmark compares like with like. Run: uvicorn bench.baseline_app:app
(ARTIFACTS_DIR, MODEL_NAME, MODEL_VERSION as for the service).
"""

import os

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
