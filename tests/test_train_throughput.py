"""bench.train_throughput: a quick run produces the table and the JSON the bench runner saves."""

from __future__ import annotations

import json

from bench import train_throughput


def test_quick_run_writes_results(tmp_path, capsys):
    result = train_throughput.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train_throughput.json").read_text())
    assert saved == result
    assert [r["batch_size"] for r in saved["rows"]] == [4, 64, 128]
    for r in saved["rows"]:
        assert r["project_images_per_s"] > 0 and r["tutorial_images_per_s"] > 0 and r["model_only_images_per_s"] > 0
        assert r["ratio"] == round(r["project_images_per_s"] / r["tutorial_images_per_s"], 2)
    out = capsys.readouterr().out
    assert "| 64 |" in out and "ratio" in out


def test_tutorial_dataset_matches_torchvision_transform():
    import torch
    from torchvision import transforms

    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    ds = train_throughput.TutorialDataset(x, torch.tensor([1, 2, 3]), transforms.ToTensor())
    img, label = ds[1]
    assert label == 2 and img.shape == (1, 28, 28) and torch.allclose(img, x[1].float() / 255)
