"""The registry of one model name: aliases, the promotion log, rollback, paired comparison and the gate.

Beside the versions of a name (core.artifacts owns those), in `<root>/<name>/`:

    PROMOTED          the `champion` alias: one line, a version. The same file and format as before
                      aliases existed, so artifacts.promoted() and the service's hot reload follow it.
    aliases/<alias>   every other alias (`challenger`, ...), the same one-line format
    promotions.jsonl  the promotion log, append-only: one JSON object per line for every promotion,
                      refusal and rollback (keys in LOG_KEYS)
    .registry.lock    held (flock) while an alias is read, gated, written and logged

An alias is a name like a model name (letters, digits, '.', '_', '-'). Each is changed atomically:
a temporary file renamed over it, so a reader sees the old holder or the new, never half a line.

The gate: promoting to `champion` compares the candidate with the current champion on the same
test images (exact McNemar test on the discordant pairs) and refuses a candidate that is
significantly worse (p < ALPHA and fewer correct), unless forced. Other aliases are not gated.
When the two cannot be compared (different dataset, a test subset, an unreadable champion) the
gate refuses too: no evidence is not evidence of no harm; `force` is the explicit way past it.

Rollback undoes promotions in order: replaying the log gives the stack of an alias's holders
(a promotion pushes, a rollback pops), so a second rollback goes one further back, and when the
log knows no earlier holder the rollback is refused (NothingToRollBack).

Per-image test predictions: every version published by training carries TEST_PREDICTIONS
(safetensors: int64 `predictions` and `labels`, one per test image in the order of the official
test set), hashed in the manifest like every file. For a version published before that file
existed they are recomputed on demand, from the verified model and the test images that the
caller supplies (`test_set`), with the service's preprocessing and TTA; nothing is written into
the immutable version folder and nothing is cached.

Errors (all RegistryError, itself an ArtifactError):
    GateRefused        the champion gate said no (the message has the p-value); the refusal is logged
    NotComparable      two versions were not evaluated on the same test images (message says how)
    NothingToRollBack  the log knows no earlier holder of the alias, or the alias was changed
                       outside the registry
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from core import artifacts
from core.artifacts import ArtifactError, IntegrityError
from core.manifest import Manifest
from core.metrics import confusion_matrix, paired_comparison
from core.models import forward_logits, preprocess

CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES_DIR = "aliases"
LOG = "promotions.jsonl"
LOCK = ".registry.lock"
TEST_PREDICTIONS = "test_predictions.safetensors"
ALPHA = 0.05
LOG_KEYS = ("time", "alias", "from", "to", "mcnemar_p", "n", "from_correct", "to_correct", "forced", "outcome",
            "reason")

# (images uint8 (N, C, H, W), labels int64 (N,)) of the official test set a manifest names
TestSet = Callable[[Manifest], tuple[torch.Tensor, torch.Tensor]]


class RegistryError(ArtifactError):
    pass


class GateRefused(RegistryError):
    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


class NotComparable(RegistryError):
    pass


class NothingToRollBack(RegistryError):
    pass


# --- aliases --------------------------------------------------------------------------------

def check_alias(alias: str) -> str:
    return artifacts.check_name(alias, "alias")


def _alias_file(root: str | Path, name: str, alias: str) -> Path:
    parent = Path(root) / artifacts.check_name(name, "model name")
    if check_alias(alias) == CHAMPION:
        return parent / artifacts.PROMOTED
    return parent / ALIASES_DIR / alias


def get_alias(root: str | Path, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when it is not set."""
    f = _alias_file(root, name, alias)
    if not f.is_file():
        return None
    return f.read_text().strip() or None


def aliases(root: str | Path, name: str) -> dict[str, str]:
    """Every set alias of `name` and its version; champion first, then by name."""
    out = {}
    champion = get_alias(root, name, CHAMPION)
    if champion:
        out[CHAMPION] = champion
    folder = Path(root) / artifacts.check_name(name, "model name") / ALIASES_DIR
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name != CHAMPION:
                version = get_alias(root, name, f.name)
                if version:
                    out[f.name] = version
    return out


def _write_alias(root: str | Path, name: str, alias: str, version: str) -> None:
    """Temporary file, fsync, rename over the alias: readers see the old holder or the new one."""
    target = _alias_file(root, name, alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    artifacts._fsync_dir(target.parent)


@contextmanager
def _locked(root: str | Path, name: str):
    """One registry change of `name` at a time (the gate reads the champion, then replaces it)."""
    parent = Path(root) / artifacts.check_name(name, "model name")
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- the promotion log ----------------------------------------------------------------------

def log_path(root: str | Path, name: str) -> Path:
    return Path(root) / artifacts.check_name(name, "model name") / LOG


def read_log(root: str | Path, name: str) -> list[dict]:
    path = log_path(root, name)
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RegistryError(f"{path}:{i} is not a JSON line ({e}); the log is append-only, "
                                "restore it rather than edit it") from None
    return records


def _append_log(root: str | Path, name: str, record: dict) -> None:
    # one write of one line on a file opened for appending; never rewritten
    with open(log_path(root, name), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _record(alias: str, old: str | None, new: str, outcome: str, forced: bool = False, **extra) -> dict:
    rec = dict.fromkeys(LOG_KEYS)
    rec.update(time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), alias=alias,
               forced=forced, outcome=outcome, **{"from": old, "to": new}, **extra)
    assert set(rec) == set(LOG_KEYS), set(rec) ^ set(LOG_KEYS)
    return rec


def holders(log: list[dict], alias: str) -> list[str]:
    """The stack of an alias's holders by the log, oldest first: promotions push, rollbacks pop."""
    stack: list[str] = []
    for r in log:
        if r.get("alias") != alias:
            continue
        if r.get("outcome") == "promoted":
            if not stack and r.get("from"):
                stack.append(r["from"])  # the holder set before the log knew the alias
            if not stack or stack[-1] != r["to"]:
                stack.append(r["to"])
        elif r.get("outcome") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != r["to"]:
                stack.append(r["to"])
    return stack


# --- per-image test predictions -------------------------------------------------------------

def write_test_predictions(folder: Path, predictions: torch.Tensor, labels: torch.Tensor) -> str:
    """Write TEST_PREDICTIONS into a version being published (publish hashes it); returns its name."""
    predictions, labels = predictions.reshape(-1).long().cpu(), labels.reshape(-1).long().cpu()
    assert predictions.shape == labels.shape, (predictions.shape, labels.shape)
    (folder / TEST_PREDICTIONS).write_bytes(save(
        {"predictions": predictions.contiguous(), "labels": labels.contiguous()},
        metadata={"order": "the official test set's order, its first n images"}))
    return TEST_PREDICTIONS


@torch.no_grad()
def predict_classes(model: torch.nn.Module, manifest: Manifest, images: torch.Tensor,
                    batch_size: int = 1000) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N,) int64 classes, computed as the service does (preprocess, TTA, softmax)."""
    model.eval()
    device = next(model.parameters()).device
    out = [forward_logits(model, preprocess(images[i:i + batch_size].to(device), manifest.input),
                          manifest.model.tta_flip).softmax(1).argmax(1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _stored_predictions(folder: Path, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    path = folder / manifest.test_predictions
    try:
        t = load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise IntegrityError(f"{path} is not a readable safetensors file ({e})") from None
    preds, labels = t.get("predictions"), t.get("labels")
    n = manifest.dataset.test
    if preds is None or labels is None or preds.shape != (n,) or labels.shape != (n,):
        raise IntegrityError(f"{path} must hold int64 'predictions' and 'labels' of shape ({n},), "
                             f"holds {({k: tuple(v.shape) for k, v in t.items()})}")
    cm = confusion_matrix(labels, preds, manifest.num_classes)
    if cm.tolist() != manifest.metrics.confusion_matrix:
        raise IntegrityError(f"{path} disagrees with the confusion matrix of {folder / artifacts.MANIFEST}")
    return preds.long(), labels.long()


@dataclass(frozen=True)
class VersionPredictions:
    manifest: Manifest
    predictions: torch.Tensor  # (n,) int64
    labels: torch.Tensor       # (n,) int64
    source: str                # "stored" or "recomputed"
    note: str | None = None    # set when recomputed predictions do not reproduce the manifest's matrix


def version_predictions(root: str | Path, name: str, version: str,
                        test_set: TestSet | None = None) -> VersionPredictions:
    """A version's per-image test predictions: its stored file, else recomputed from the verified model."""
    folder = artifacts.resolve(root, name, version)
    manifest = artifacts.verify(folder)
    if manifest.test_predictions is not None:
        return VersionPredictions(manifest, *_stored_predictions(folder, manifest), "stored")
    if test_set is None:
        raise RegistryError(f"{name}/{version} was published without {TEST_PREDICTIONS}; recomputing its predictions "
                            "needs the test images (pass test_set)")
    images, labels = test_set(manifest)
    n = manifest.dataset.test
    if len(labels) < n:
        raise NotComparable(f"{name}/{version} was evaluated on {n} test images, the test set at hand has "
                            f"{len(labels)}")
    images, labels = images[:n], labels[:n].long()
    # the labels alone fix each row sum of the manifest's matrix: a different test set shows here
    support = torch.bincount(labels, minlength=manifest.num_classes).tolist()
    expected = [sum(row) for row in manifest.metrics.confusion_matrix]
    if support != expected:
        raise NotComparable(f"the test images at hand are not those {name}/{version} was evaluated on "
                            f"(class counts {support} vs its manifest's {expected})")
    loaded = artifacts.load(root, name, version)
    preds = predict_classes(loaded.model, manifest, images)
    note = None
    cm = confusion_matrix(labels, preds, manifest.num_classes)
    if cm.tolist() != manifest.metrics.confusion_matrix:
        diff = int((cm - torch.tensor(manifest.metrics.confusion_matrix)).abs().sum()) // 2
        note = (f"recomputed predictions of {version} differ from its manifest's confusion matrix on about {diff} "
                f"image(s) ({int(cm.trace())} vs {manifest.metrics.correct} correct; numerical differences between "
                "devices or libraries)")
    return VersionPredictions(manifest, preds, labels, "recomputed", note)


# --- paired comparison ----------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    name: str
    a: str
    b: str
    dataset: str
    n: int
    a_correct: int
    b_correct: int
    a_right_b_wrong: int
    a_wrong_b_right: int
    mcnemar_p: float
    diff: float                      # accuracy(B) - accuracy(A)
    diff_ci95: tuple[float, float]   # Agresti-Min interval of the paired difference
    verdict: str                     # "B better", "A better" or "no significant difference"
    alpha: float
    predictions: dict                # {"a": "stored"|"recomputed", "b": ...}
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["diff_ci95"], d["notes"] = list(self.diff_ci95), list(self.notes)
        return d


def check_same_images(name: str, a: str, ma: Manifest, b: str, mb: Manifest) -> None:
    """Both versions evaluated on the full official test set of the same dataset, or NotComparable."""
    da, db = ma.dataset, mb.dataset
    if da.name != db.name:
        raise NotComparable(f"{name}/{a} was evaluated on {da.name}, {name}/{b} on {db.name}: not the same images")
    for v, d in ((a, da), (b, db)):
        if not d.test_is_full_official_set:
            raise NotComparable(f"{name}/{v} was evaluated on a subset ({d.test} images, limit_test) of the "
                                f"{d.name} test set; a comparison needs both on the full official test set")
    if da.test != db.test:
        raise NotComparable(f"{name}/{a} and {name}/{b} disagree on the size of the {da.name} test set "
                            f"({da.test} vs {db.test} images)")
    if ma.classes != mb.classes:
        raise NotComparable(f"{name}/{a} and {name}/{b} name different classes: {ma.classes} vs {mb.classes}")


def compare(root: str | Path, name: str, a: str, b: str, test_set: TestSet | None = None,
            alpha: float = ALPHA) -> Comparison:
    """Paired comparison of versions A and B on the same test images (McNemar, paired interval, verdict)."""
    ma = artifacts.read_manifest(artifacts.resolve(root, name, a))
    mb = artifacts.read_manifest(artifacts.resolve(root, name, b))
    check_same_images(name, a, ma, b, mb)  # before any model runs
    pa = version_predictions(root, name, a, test_set)
    pb = version_predictions(root, name, b, test_set)
    if not torch.equal(pa.labels, pb.labels):
        raise NotComparable(f"{name}/{a} and {name}/{b} carry different labels for the same {ma.dataset.name} "
                            f"test images ({int((pa.labels != pb.labels).sum())} differ): not the same test set")
    figures = paired_comparison(pa.predictions == pa.labels, pb.predictions == pb.labels, alpha)
    return Comparison(name=name, a=a, b=b, dataset=ma.dataset.name, **figures, alpha=alpha,
                      predictions={"a": pa.source, "b": pb.source},
                      notes=tuple(x.note for x in (pa, pb) if x.note))


# --- promote and roll back ------------------------------------------------------------------

def promote(root: str | Path, name: str, version: str, alias: str = CHAMPION, force: bool = False,
            test_set: TestSet | None = None) -> dict:
    """Point `alias` at `version` (verified first); the champion is gated. Returns the logged record.

    Raises GateRefused (after logging the refusal) when the candidate is significantly worse than the
    champion, or cannot be compared with it, and `force` is not set.
    """
    check_alias(alias)
    folder = artifacts.resolve(root, name, artifacts.check_name(version, "version"))
    artifacts.verify(folder)  # never point an alias at a version the service would refuse
    with _locked(root, name):
        current = get_alias(root, name, alias)
        extra: dict = {}
        if alias == CHAMPION and current is not None and current != version:
            try:
                c = compare(root, name, current, version, test_set)
            except (ArtifactError, OSError) as e:  # includes NotComparable and an unreadable champion
                extra["reason"] = f"not compared with champion {current}: {e}"
                if not force:
                    rec = _record(alias, current, version, "refused", force, **extra)
                    _append_log(root, name, rec)
                    raise GateRefused(f"refused: {name}/{version} cannot be compared with champion {current} ({e}); "
                                      "use --force to promote without the paired test", rec) from None
            else:
                extra.update(mcnemar_p=c.mcnemar_p, n=c.n, from_correct=c.a_correct, to_correct=c.b_correct)
                worse = c.mcnemar_p < ALPHA and c.b_correct < c.a_correct
                if worse:
                    extra["reason"] = (f"significantly worse than champion {current}: {c.b_correct} vs {c.a_correct} "
                                       f"correct of {c.n}, McNemar p = {c.mcnemar_p:.3g}")
                if worse and not force:
                    rec = _record(alias, current, version, "refused", force, **extra)
                    _append_log(root, name, rec)
                    raise GateRefused(f"refused: {name}/{version} is {extra['reason']} (alpha {ALPHA}); "
                                      "use --force to promote it anyway", rec)
        rec = _record(alias, current, version, "promoted", force, **extra)
        _write_alias(root, name, alias, version)
        _append_log(root, name, rec)
    return rec


def rollback(root: str | Path, name: str, alias: str = CHAMPION) -> dict:
    """Point `alias` back at its previous holder by the log (verified first); returns the logged record."""
    check_alias(alias)
    artifacts.resolve(root, name)  # the name has versions (else ArtifactNotFound, and no folder is made)
    with _locked(root, name):
        current = get_alias(root, name, alias)
        stack = holders(read_log(root, name), alias)
        if current is None:
            raise NothingToRollBack(f"alias {alias!r} of {name!r} is not set; nothing to roll back")
        if stack and stack[-1] != current:
            raise NothingToRollBack(f"alias {alias!r} of {name!r} holds {current}, but the promotion log's last "
                                    f"holder is {stack[-1]}: it was changed outside the registry; promote the "
                                    "version you want instead")
        if len(stack) < 2:
            raise NothingToRollBack(f"the promotion log of {name!r} knows no holder of {alias!r} before {current}; "
                                    "nothing to roll back to")
        target = stack[-2]
        try:
            artifacts.verify(artifacts.resolve(root, name, target))
        except ArtifactError as e:
            raise RegistryError(f"cannot roll {alias!r} back to {name}/{target}: {e}") from None
        rec = _record(alias, current, target, "rollback")
        _write_alias(root, name, alias, target)
        _append_log(root, name, rec)
    return rec
