"""Datasets as in-memory uint8 tensors (N, C, H, W), and augmentation on whole batches.

No per-sample Python transforms: the hot loop slices one tensor. Files are read with numpy
from the datasets' original formats (idx for MNIST-like, the binary version for CIFAR-10),
so nothing is unpickled and nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Where `apt-get install dataset-fashion-mnist` puts the four original .gz files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str            # the folder the files came from
    files: dict[str, str] = field(default_factory=dict)  # sha256 of each file read, by name inside `source`

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # (C, H, W)


class DataNotFound(FileNotFoundError):
    pass


def _read_hashed(path: Path, hashes: dict[str, str]) -> bytes:
    """The file's bytes; their sha256 goes into `hashes` under the file's name: the hash is of
    exactly the bytes trained on (a replay compares it before training)."""
    raw = path.read_bytes()
    hashes[path.name] = hashlib.sha256(raw).hexdigest()
    return raw


def _read_idx(path: Path, hashes: dict[str, str]) -> np.ndarray:
    """The idx format of MNIST: magic (0, 0, dtype, ndim), ndim big-endian int32 sizes, then data."""
    raw = _read_hashed(path, hashes)
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims.tolist()} but holds {data.size} bytes")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _idx_folders(data_dir: str | None, torchvision_name: str, debian: str | None) -> list[Path]:
    """Candidate folders, most specific first: the user's folder (flat or torchvision layout),
    ./data in torchvision layout, then the Debian package's folder."""
    roots = [Path(data_dir)] if data_dir else [Path("data")]
    out = []
    for r in roots:
        out += [r, r / torchvision_name / "raw", r / torchvision_name]
    if debian and not data_dir:
        out.append(Path(debian))
    return out


def load_idx_dataset(name: str, data_dir: str | None) -> Dataset:
    tv_name, classes, debian = {
        "fashion_mnist": ("FashionMNIST", FASHION_CLASSES, DEBIAN_FASHION_MNIST),
        "mnist": ("MNIST", MNIST_CLASSES, None),
    }[name]
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    tried = _idx_folders(data_dir, tv_name, debian)
    for folder in tried:
        paths = [_find(folder, s) for s in stems]
        if all(paths):
            hashes: dict[str, str] = {}
            tx, ty, vx, vy = (_read_idx(p, hashes) for p in paths)
            return Dataset(name, classes,
                           torch.from_numpy(tx.copy()).unsqueeze(1), torch.from_numpy(ty.astype(np.int64)),
                           torch.from_numpy(vx.copy()).unsqueeze(1), torch.from_numpy(vy.astype(np.int64)),
                           str(folder), hashes)
    hint = ("install the Debian package: apt-get install dataset-fashion-mnist, or "
            if name == "fashion_mnist" else "")
    raise DataNotFound(f"{name}: the four idx files ({', '.join(stems)}, optionally .gz) were not found in "
                       f"{', '.join(map(str, tried))}; {hint}point DATA_DIR / --data-dir at a folder holding them")


def load_cifar10(data_dir: str | None) -> Dataset:
    """CIFAR-10's binary version (cifar-10-batches-bin): records of 1 label byte + 3072 pixel bytes.
    The python version of the archive is pickled and is refused rather than unpickled."""
    root = Path(data_dir or "data")
    for folder in (root / "cifar-10-batches-bin", root):
        train = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
        test = folder / "test_batch.bin"
        if all(p.is_file() for p in train) and test.is_file():
            def read(paths, hashes):
                recs = np.concatenate([np.frombuffer(_read_hashed(p, hashes), dtype=np.uint8).reshape(-1, 3073)
                                       for p in paths])
                return (torch.from_numpy(recs[:, 1:].reshape(-1, 3, 32, 32).copy()),
                        torch.from_numpy(recs[:, 0].astype(np.int64)))
            hashes: dict[str, str] = {}
            tx, ty = read(train, hashes)
            vx, vy = read([test], hashes)
            return Dataset("cifar10", CIFAR10_CLASSES, tx, ty, vx, vy, str(folder), hashes)
    if (root / "cifar-10-batches-py").is_dir():
        raise DataNotFound(f"{root}/cifar-10-batches-py is the pickled python version, which this project never "
                           "unpickles; use the binary version (cifar-10-binary.tar.gz -> cifar-10-batches-bin)")
    raise DataNotFound(f"cifar10: no cifar-10-batches-bin folder under {root}; point --data-dir at it")


DATASETS = {"fashion_mnist": lambda d: load_idx_dataset("fashion_mnist", d),
            "mnist": lambda d: load_idx_dataset("mnist", d),
            "cifar10": load_cifar10}


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_dir or os.environ.get("DATA_DIR") or None)


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded permutation of range(n) cut into (train indices, validation indices)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale."""
    xf = x.float().div_(255)
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).tolist()


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2, flip: bool = True,
            erase: float = 0.0) -> torch.Tensor:
    """Random horizontal flips, translations of up to max_shift pixels and (when erase > 0) random
    erasing, for a whole batch at once.

    x: (B, C, H, W) float. Shifts pad with zeros (the background after normalisation is not zero,
    so pad before normalising: the caller passes 0..1 pixels).

    Random numbers are drawn on the generator's device. A CUDA generator keeps the step on the GPU: a
    CPU draw copied to the GPU is a blocking copy (ATen's copy from pageable memory synchronises the
    stream), three times per step. A CPU generator draws exactly what it always did (same calls, same
    order), so CPU runs keep their weights hash; with erase=0 nothing more is drawn.
    """
    b, c, h, w = x.shape
    dev = gen.device
    if flip:
        mask = torch.rand(b, generator=gen, device=dev) < 0.5
        x = torch.where(mask.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    if max_shift:
        p = max_shift
        padded = torch.nn.functional.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev).to(x.device)
        rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w)
        cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
        # gather rows then columns: (B, C, H, W+2p) then (B, C, H, W)
        x = padded.gather(2, rows[..., :1].expand(b, c, h, w + 2 * p)).gather(3, cols)
    if erase:
        x = random_erase(x, gen, erase)
    return x


def random_erase(x: torch.Tensor, gen: torch.Generator, p: float, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017) as one batch operation: each image, with probability p, gets one
    box of scale * H * W pixels (uniform in `scale`) and height/width ratio (log-uniform in `ratio`) filled
    with uniform noise on the 0..1 pixel scale. torchvision's RandomErasing (same default scale and ratio)
    retries up to 10 times for a box that fits; here a box's sides are clipped to the image instead, so
    there is no per-image loop and no data-dependent shape. x: (B, C, H, W) pixels on the 0..1 scale.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"random erasing probability must be in [0, 1], got {p}")
    b, c, h, w = x.shape
    dev = gen.device
    u = torch.rand(5, b, generator=gen, device=dev)  # per image: on, area, ratio, top, left
    on = u[0] < p
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[1])
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[2])  # box height / width
    eh = (area * r).sqrt().round().clamp(1, h)  # (B,) box height in pixels
    ew = (area / r).sqrt().round().clamp(1, w)
    top = ((h - eh + 1) * u[3]).floor()  # 0 .. h - eh
    left = ((w - ew + 1) * u[4]).floor()
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
    box = (on[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (B, 1, H, W)
    noise = torch.rand(b, c, h, w, generator=gen, device=dev, dtype=x.dtype)
    return torch.where(box.to(x.device), noise.to(x.device), x)
