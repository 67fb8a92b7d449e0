"""Adaptive batching: concurrent /predict requests share forward passes and each gets its own answer."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from core import artifacts
from service import metrics
from service.inference import Batcher, Classifier


def test_concurrent_requests_are_batched_and_answered_with_their_own_images(lenet_version, fashion):
    root, name, version, _ = lenet_version
    clf = Classifier(artifacts.load(root, name, version), torch.device("cpu"))
    passes = []
    original = clf.probabilities

    def counting(x):
        passes.append(len(x))
        return original(x)

    clf.probabilities = counting
    batcher = Batcher(clf, max_batch=64)
    images = [fashion.test_x[i:i + k].numpy() for i, k in zip(range(0, 200, 5), [1, 2, 3, 4, 5] * 8)]

    async def run():
        return await asyncio.gather(*(batcher.probabilities(x) for x in images))

    histogram = metrics.get().forward_batch_size.labels(version)
    before = _count_and_sum(histogram)
    got = asyncio.run(run())
    for x, p in zip(images, got):
        assert p.shape == (len(x), 10)
        assert torch.allclose(p, original(x), atol=1e-6)  # same as a pass of its own
    assert sum(passes) == sum(len(x) for x in images)
    assert len(passes) < len(images), "requests that arrive together share forward passes"
    assert max(passes) <= 64
    after = _count_and_sum(histogram)  # imgclf_forward_batch_size observed each pass
    assert (after[0] - before[0], after[1] - before[1]) == (len(passes), sum(passes))


def _count_and_sum(histogram) -> tuple[float, float]:
    samples = {s.name: s.value for m in histogram.collect() for s in m.samples}
    return samples["imgclf_forward_batch_size_count"], samples["imgclf_forward_batch_size_sum"]


def test_an_idle_request_runs_at_once_and_errors_reach_every_waiter(lenet_version):
    root, name, version, _ = lenet_version
    clf = Classifier(artifacts.load(root, name, version), torch.device("cpu"))
    batcher = Batcher(clf)
    x = np.zeros((1, 1, 28, 28), np.uint8)
    assert asyncio.run(batcher.probabilities(x)).shape == (1, 10)

    def broken(_):
        raise RuntimeError("boom")

    clf.probabilities = broken

    async def run():
        return await asyncio.gather(*(batcher.probabilities(x) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(run()))
    assert not batcher.draining and not batcher.pending
