"""Versioned, immutable, hashed model artifacts: `<root>/<name>/<version>/`.

A version is written into a hidden temporary folder and renamed into place when complete, so
no reader ever sees half of one. Every file is listed in `manifest.json` with its sha256 and
checked before it is trusted; weights are safetensors, never pickle.

Errors (all subclasses of ArtifactError, so a caller can catch one type):
    ArtifactNotFound  no such name, version, or no version at all
    IntegrityError    a file is missing, extra, or its hash differs from the manifest
    InvalidName       a name or version that could reach outside the artifacts folder
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from core.manifest import Manifest, ManifestError
from core.models import build_model

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
PROMOTED = "PROMOTED"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(Exception):
    """Base class of every artifact problem; the message says what and where."""


class ArtifactNotFound(ArtifactError):
    pass


class IntegrityError(ArtifactError):
    pass


class InvalidName(ArtifactError):
    pass


def check_name(value: str, what: str) -> str:
    """Names and versions are single path components of safe characters: no '/', no '..'."""
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise InvalidName(f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit, no '..'")
    return value


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(root: str | Path, name: str, state_dict: dict[str, torch.Tensor], manifest: Manifest,
            write_extras=None) -> Path:
    """Write a new version atomically and return its folder.

    `manifest` is complete but for what only publishing knows (name, version, weights hash, files).
    `write_extras(folder, manifest)` may add human-facing files (pictures, report); they are hashed too.
    The version id is `<UTC time>-<first 8 hex of the weights hash>`, so ids sort by time.
    """
    check_name(name, "model name")
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        # serialise in memory, write with plain file I/O: a full disk then raises OSError(ENOSPC)
        (tmp / WEIGHTS).write_bytes(save(tensors))
        weights_sha = sha256_file(tmp / WEIGHTS)
        version = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + weights_sha[:8]
        manifest = manifest.replace(name=name, version=version, weights_sha256=weights_sha)
        if write_extras is not None:
            write_extras(tmp, manifest)
        manifest = manifest.replace(files={p.relative_to(tmp).as_posix(): sha256_file(p)
                                           for p in sorted(tmp.rglob("*")) if p.is_file()})
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest.to_dict(), f, indent=2)
            f.write("\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        final = parent / version
        if final.exists():
            raise ArtifactError(f"version {final} already exists; versions are never overwritten")
        os.rename(tmp, final)
        _fsync_dir(parent)
        return final
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise ArtifactError(f"no space left on the device of {parent} while publishing; nothing was "
                                "published (free space and run again)") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(parent: Path) -> None:
    """Temporary folders of publishers that were killed (their pid is gone) are removed."""
    for p in parent.glob(".tmp-*"):
        try:
            pid = int(p.name.split("-")[1])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def list_versions(root: str | Path, name: str) -> list[str]:
    """Complete versions of `name`, oldest first (temporary folders are hidden)."""
    parent = Path(root) / check_name(name, "model name")
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def list_names(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _SAFE.match(p.name) and list_versions(root, p.name))


def promoted(root: str | Path, name: str) -> str | None:
    f = Path(root) / check_name(name, "model name") / PROMOTED
    return f.read_text().strip() if f.is_file() else None


def promote(root: str | Path, name: str, version: str) -> None:
    """Mark a version as the one to serve; an atomic rename, so readers see the old or the new."""
    check_name(version, "version")
    if version not in list_versions(root, name):
        raise ArtifactNotFound(f"no version {version!r} of {name!r} under {root}; "
                               f"known: {', '.join(list_versions(root, name)) or 'none'}")
    verify(Path(root) / name / version)  # never promote a version the service would refuse
    parent = Path(root) / name
    tmp = parent / f".{PROMOTED}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, parent / PROMOTED)


def resolve(root: str | Path, name: str, version: str | None = None) -> Path:
    """The folder of `version`, or of the promoted version, else the newest."""
    check_name(name, "model name")
    versions = list_versions(root, name)
    if not versions:
        raise ArtifactNotFound(f"no versions of model {name!r} under {Path(root).resolve()}; "
                               f"run `make train` first (models there: {', '.join(list_names(root)) or 'none'})")
    if version is None:
        version = promoted(root, name) or versions[-1]
    check_name(version, "version")
    if version not in versions:
        raise ArtifactNotFound(f"no version {version!r} of model {name!r}; known: {', '.join(versions)}")
    return Path(root) / name / version


def read_manifest(folder: Path) -> Manifest:
    """The typed manifest of a version folder, without checking the files (verify does)."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise IntegrityError(f"{mf} is missing")
    try:
        return Manifest.from_dict(json.loads(mf.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{mf} is not valid JSON: {e}") from None
    except ManifestError as e:
        raise IntegrityError(f"{mf} refused: {e}") from None


def verify(folder: Path) -> Manifest:
    """Read the manifest and check every file it lists, and that nothing else sits beside them."""
    mf = folder / MANIFEST
    manifest = read_manifest(folder)
    files = manifest.files
    if WEIGHTS not in files:
        raise IntegrityError(f"{mf} lists no files with hashes (or not {WEIGHTS})")
    if files[WEIGHTS] != manifest.weights_sha256:
        raise IntegrityError(f"{mf}: files[{WEIGHTS}] and weights_sha256 disagree")
    if manifest.test_predictions is not None and manifest.test_predictions not in files:
        raise IntegrityError(f"{mf} names test_predictions {manifest.test_predictions!r} but lists no hash for it")
    if manifest.onnx is not None and manifest.onnx not in files:
        raise IntegrityError(f"{mf} names onnx {manifest.onnx!r} but lists no hash for it")
    for rel, expected in files.items():
        p = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise IntegrityError(f"{mf} lists a path outside its folder: {rel!r}")
        if not p.is_file():
            raise IntegrityError(f"{p} is listed in the manifest but missing")
        actual = sha256_file(p)
        if actual != expected:
            raise IntegrityError(f"{p}: sha256 {actual} does not match the manifest's {expected}")
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != MANIFEST and p.relative_to(folder).as_posix() not in files)
    if extra:
        raise IntegrityError(f"{folder} holds files the manifest does not list: {', '.join(extra)}")
    return manifest


@dataclass
class LoadedModel:
    folder: Path
    manifest: Manifest
    model: torch.nn.Module

    @property
    def version(self) -> str:
        return self.manifest.version


def load(root: str | Path, name: str, version: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve, verify every hash, then build the architecture from the manifest and load the tensors."""
    folder = resolve(root, name, version)
    manifest = verify(folder)
    spec, inp = manifest.model, manifest.input
    model = build_model(spec.arch, inp.channels, inp.height, inp.width, manifest.num_classes, **spec.kwargs)
    try:
        state = load_file(folder / WEIGHTS, device="cpu")  # safetensors: tensors only, no code runs
    except SafetensorError as e:
        # e.g. a pickle put in place of the weights, with its hash written into the manifest
        raise IntegrityError(f"{folder / WEIGHTS} is not a valid safetensors file ({e}); refused") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IntegrityError(f"{folder / WEIGHTS} does not fit the manifest's model {spec.arch!r}: {e}") from None
    model.to(device).eval()
    return LoadedModel(folder, manifest, model)
