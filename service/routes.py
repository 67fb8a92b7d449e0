"""The API routes, declared once. The service's @bentoml.api declarations, the guard's checks and the
error documentation of /docs.json all read this table."""

from __future__ import annotations

from dataclasses import dataclass

JSON = "json"  # a JSON object body (application/json)
FILE = "file"  # a multipart/form-data upload with the file in field 'file'

_IMAGES = '"images": [H x W lists of pixel values 0..255 (the shape is in /model_info), ...]'


@dataclass(frozen=True)
class Route:
    path: str
    kind: str  # JSON or FILE
    expected: str  # the body it takes, told to a client whose request was malformed
    also_get: bool = False  # BentoML routes APIs as POST only; the guard lets a GET read the same answer


PREDICT = Route("/predict", JSON, "{" + _IMAGES + ', "top_k": 1..10 (optional)}')
PREDICT_IMAGE = Route("/predict_image", FILE,
                      "a multipart/form-data upload: a PNG or JPEG in field 'file', 'top_k' 1..10 (optional)")
EVALUATE = Route("/evaluate", JSON, "{" + _IMAGES + ', "labels": [an integer class index per image]}')
EVALUATE_NPZ = Route("/evaluate_npz", FILE, "a multipart/form-data upload: an .npz in field 'file' with uint8 "
                     "'images' (N, H, W) and integer 'labels' (N,)")
MODEL_INFO = Route("/model_info", JSON, "an empty body", also_get=True)

ROUTES: dict[str, Route] = {r.path: r for r in (PREDICT, PREDICT_IMAGE, EVALUATE, EVALUATE_NPZ, MODEL_INFO)}
