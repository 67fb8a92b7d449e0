"""One short check of the CUDA path on a machine with a GPU (run by hand where one is lent).

    DATA_DIR=/folder/with/fashion-mnist python -m bench.gpu_check [--out DIR]

1. trains LeNet 2 epochs with device=cuda and publishes a version (same format as on CPU);
2. loads that version on cuda and on cpu and compares their predictions on the 10,000 test images;
3. times in-process batched inference on each device;
4. runs the service's inference path (service.inference.Classifier) on cuda over the test set.
Prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from core import artifacts
from core.models import forward_logits, preprocess, probabilities
from training.config import make_config
from training.data import load_dataset
from training.pipeline import train


def infer(loaded, x: torch.Tensor, device: str, batch: int = 1000) -> tuple[torch.Tensor, float]:
    spec, tta = loaded.manifest.input, loaded.manifest.model.tta_flip
    temperature = loaded.manifest.metrics.calibration.temperature
    x = x.to(device)
    out = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up pass, then the timed one
            out.clear()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, len(x), batch):
                out.append(probabilities(forward_logits(loaded.model, preprocess(x[i:i + batch], spec), tta),
                                         temperature))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
    return torch.cat(out).cpu(), len(x) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device visible"
    root = args.out or tempfile.mkdtemp()
    t = time.perf_counter()
    folder = train(make_config(model="lenet", epochs=2, device="cuda", artifacts_dir=root), log=print)
    train_s = time.perf_counter() - t
    m = artifacts.verify(folder)
    ds = load_dataset("fashion_mnist")
    gpu = artifacts.load(root, "lenet", folder.name, device="cuda")
    cpu = artifacts.load(root, "lenet", folder.name, device="cpu")
    p_gpu, gpu_ips = infer(gpu, ds.test_x, "cuda")
    p_cpu, cpu_ips = infer(cpu, ds.test_x, "cpu")
    agree = float((p_gpu.argmax(1) == p_cpu.argmax(1)).float().mean())
    acc_gpu = float((p_gpu.argmax(1) == ds.test_y).float().mean())
    # the service's own inference path (service/inference.py, no BentoML needed) on the GPU
    from service.inference import Classifier
    clf = Classifier(gpu, torch.device("cuda"))
    served = clf.evaluate(ds.test_x.numpy(), ds.test_y.numpy())
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "train_seconds": round(train_s, 1),
               "service_classifier_cuda_accuracy": served["accuracy"],
               "service_matches_manifest": served["accuracy"] == m.metrics.test_accuracy,
               "manifest_device": m.training.device, "manifest_test_accuracy": m.metrics.test_accuracy,
               "reloaded_gpu_accuracy": acc_gpu, "gpu_cpu_argmax_agreement": agree,
               "max_abs_prob_diff": float((p_gpu - p_cpu).abs().max()),
               "gpu_images_per_s": round(gpu_ips), "cpu_images_per_s": round(cpu_ips),
               "hash_verified": m.weights_sha256 == artifacts.sha256_file(folder / artifacts.WEIGHTS)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
