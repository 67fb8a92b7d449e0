"""training/data.py: idx files from a folder (flat or torchvision layout) or the Debian package,
clear errors when missing, seeded batch augmentation and a seeded disjoint split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    DEBIAN_FASHION_MNIST,
    FASHION_CLASSES,
    DataNotFound,
    augment,
    channel_stats,
    load_dataset,
    random_erase,
    split,
)

STEMS = {"train-images-idx3-ubyte": (12, 28, 28), "train-labels-idx1-ubyte": (12,),
         "t10k-images-idx3-ubyte": (5, 28, 28), "t10k-labels-idx1-ubyte": (5,)}


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_idx(folder: Path, gz: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for stem, shape in STEMS.items():
        arr = rng.integers(0, 10 if "labels" in stem else 256, size=shape, dtype=np.uint8)
        arrays[stem] = arr
        raw = _idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def _check(ds, arrays):
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.train_y.shape == (12,)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.shape == (1, 28, 28)


def test_idx_gz_files_in_a_flat_folder(tmp_path):
    arrays = _write_idx(tmp_path / "flat")
    ds = load_dataset("fashion_mnist", str(tmp_path / "flat"))
    _check(ds, arrays)
    assert ds.classes == FASHION_CLASSES and ds.source == str(tmp_path / "flat")


def test_torchvision_layout_uncompressed(tmp_path):
    arrays = _write_idx(tmp_path / "root" / "FashionMNIST" / "raw", gz=False)
    ds = load_dataset("fashion_mnist", str(tmp_path / "root"))
    _check(ds, arrays)
    assert ds.source.endswith("FashionMNIST/raw")


def test_mnist_from_torchvision_layout_has_digit_classes(tmp_path):
    arrays = _write_idx(tmp_path / "root" / "MNIST" / "raw")
    ds = load_dataset("mnist", str(tmp_path / "root"))
    _check(ds, arrays)
    assert ds.classes == [str(d) for d in range(10)]


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    arrays = _write_idx(tmp_path / "env")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "env"))
    _check(load_dataset("fashion_mnist"), arrays)


def test_missing_files_give_a_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFound) as e:
        load_dataset("fashion_mnist", str(tmp_path / "empty"))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path / "empty") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_a_corrupt_idx_file_is_refused(tmp_path):
    _write_idx(tmp_path / "bad")
    (tmp_path / "bad" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(ValueError, match="header says"):
        load_dataset("fashion_mnist", str(tmp_path / "bad"))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; known datasets: cifar10, fashion_mnist, mnist"):
        load_dataset("svhn")


def test_cifar10_binary_version_and_the_pickled_one_refused(tmp_path):
    folder = tmp_path / "c" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rec = np.zeros((2, 3073), dtype=np.uint8)
    rec[:, 0] = [3, 7]
    rec[1, 1:] = 255
    for i in range(1, 6):
        rec.tofile(folder / f"data_batch_{i}.bin")
    rec.tofile(folder / "test_batch.bin")
    ds = load_dataset("cifar10", str(tmp_path / "c"))
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.test_y.tolist() == [3, 7]
    assert ds.classes[3] == "cat" and int(ds.train_x[1].min()) == 255
    (tmp_path / "p" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataNotFound, match="never unpickles"):
        load_dataset("cifar10", str(tmp_path / "p"))


@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_the_debian_files_load_with_the_official_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here
    monkeypatch.delenv("DATA_DIR", raising=False)
    ds = load_dataset("fashion_mnist")
    assert ds.source == DEBIAN_FASHION_MNIST
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10


def test_split_is_seeded_disjoint_and_complete():
    tr, va = split(1000, 0.1, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1000))
    tr2, va2 = split(1000, 0.1, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(split(1000, 0.1, seed=4)[1], va)
    assert len(split(10, 0.0, 0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split(10, 1.0, 0)


def _images(n=16):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_augment_keeps_shape_and_dtype_and_is_seeded():
    x = _images()
    a = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, x)
    x3 = torch.rand(4, 3, 32, 32)
    assert augment(x3, torch.Generator().manual_seed(0)).shape == (4, 3, 32, 32)


def test_augment_flips_are_mirror_images():
    x = _images(64)
    a = augment(x, torch.Generator().manual_seed(0), max_shift=0)
    same = [torch.equal(a[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(a[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54  # about half


def test_augment_shifts_move_pixels_by_at_most_max_shift():
    x = torch.zeros(32, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    a = augment(x, torch.Generator().manual_seed(0), max_shift=2, flip=False)
    assert torch.equal(a.sum((1, 2, 3)), torch.ones(32))  # the pixel is moved, not blurred or lost
    pos = a[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 28, pos % 28
    assert ((rows - 14).abs() <= 2).all() and ((cols - 14).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5



def test_augment_on_a_cpu_generator_draws_what_it_always_drew():
    # CPU runs keep their weights hash only if augment consumes the generator exactly as before the
    # draws moved to the generator's device: one rand(B) for the flips, two randint(0, 5, (B,)) for
    # the shifts, nothing for erasing when it is off
    x = _images(8)
    g = torch.Generator().manual_seed(3)
    augment(x, g)
    ref = torch.Generator().manual_seed(3)
    torch.rand(8, generator=ref), torch.randint(0, 5, (8,), generator=ref), torch.randint(0, 5, (8,), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    g0 = torch.Generator().manual_seed(3)
    assert torch.equal(augment(x, g0, erase=0.0), augment(x, torch.Generator().manual_seed(3)))


def _boxes(a, x):
    """Per image: the set of changed pixels, as (rows, cols) index tensors."""
    changed = (a != x)[:, 0]
    return [changed[i].nonzero(as_tuple=True) for i in range(len(x))]


def test_random_erase_fills_one_box_per_chosen_image_with_noise():
    x = torch.full((64, 1, 28, 28), 2.0)  # outside 0..1, so every erased pixel shows
    a = random_erase(x, torch.Generator().manual_seed(0), p=1.0)
    assert a.shape == x.shape and a.dtype == x.dtype
    areas = []
    for rows, cols in _boxes(a, x):
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert len(rows) == h * w  # one solid rectangle
        areas.append(h * w / 784)
    assert min(areas) > 0.01 and max(areas) < 0.40  # scale 0.02 .. 0.33 of the image, up to rounding
    erased = a != x
    assert ((a[erased] >= 0) & (a[erased] < 1)).all()  # uniform noise on the 0..1 pixel scale
    assert torch.equal(a, random_erase(x, torch.Generator().manual_seed(0), p=1.0))  # seeded


def test_random_erase_probability():
    x = torch.full((400, 1, 28, 28), 2.0)
    hit = (random_erase(x, torch.Generator().manual_seed(0), p=0.5) != x).flatten(1).any(1)
    assert 150 < int(hit.sum()) < 250
    assert torch.equal(random_erase(x, torch.Generator().manual_seed(0), p=0.0), x)
    with pytest.raises(ValueError, match="in \\[0, 1\\], got 2"):
        random_erase(x, torch.Generator(), p=2)


def test_augment_with_erase_erases_after_flips_and_shifts():
    x = _images(64)
    plain = augment(x, torch.Generator().manual_seed(0))
    erased = augment(x, torch.Generator().manual_seed(0), erase=1.0)
    assert (erased != plain).flatten(1).any(1).all()  # the same flips and shifts, then a box in each image


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augment_on_a_cuda_generator_never_syncs_the_host():
    x = torch.rand(256, 1, 28, 28, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call (a blocking copy, .item()) raises
    try:
        a = augment(x, g, erase=0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert a.device.type == "cuda" and a.shape == x.shape

def test_channel_stats_on_the_0_1_scale():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    mean, std = channel_stats(x)
    assert mean == [0.5] and std == pytest.approx([0.7071], abs=1e-4)
