"""`make bento` and `make containerize`.

    python -m deploy.bento build         # import the chosen version into BentoML's model store, then `bentoml build`
    python -m deploy.bento containerize [TAG]  # `bentoml containerize` where a container engine answers

The version is chosen as the service chooses it (ARTIFACTS_DIR, MODEL_NAME, MODEL_VERSION; the
champion, else the newest) and verified before it is imported as `imgclf-<name>:<version>` (labels:
the aliases it holds; metadata: test accuracy and weights sha256), so `bentoml models list` shows it
and `bentoml models export` carries it. The Bento references that tag; the service inside it finds
the tag in its bento.yaml and serves exactly that version, whatever ARTIFACTS_DIR says, after
verifying every file's hash again (service/store.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from core import artifacts, registry
from service import store

ROOT = Path(__file__).resolve().parent.parent


def import_version(root: str, name: str, version: str | None) -> str:
    """Verify the version and import it into the local model store (once); returns its tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    folder = artifacts.resolve(root, name, version)
    manifest = artifacts.verify(folder)
    tag = store.tag_for(name, folder.name)
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        try:
            artifacts.verify(store.artifacts_root(existing.path) / name / folder.name)
            return tag
        except artifacts.ArtifactError as e:  # a damaged copy in the store: replace it with the verified one
            print(f"replacing {tag} in the model store: {e}", file=sys.stderr)
            bentoml.models.delete(tag)
    held = sorted(alias for alias, v in registry.aliases(root, name).items() if v == folder.name)
    labels = {"project": "imgclf", "model": name, **{f"alias-{a}": "true" for a in held}}
    metadata = {"test_accuracy": manifest.metrics.test_accuracy, "weights_sha256": manifest.weights_sha256,
                "aliases": held, "architecture": manifest.model.arch}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        shutil.copytree(folder, store.artifacts_root(model.path) / name / folder.name)
    return tag


def bentoml_cli() -> str:
    return str(Path(sys.executable).with_name("bentoml"))


def build() -> str:
    tag = import_version(os.environ.get("ARTIFACTS_DIR", "artifacts"), os.environ.get("MODEL_NAME", "cnn"),
                         os.environ.get("MODEL_VERSION") or None)
    print(f"model store: {tag}")
    name, version = tag[len(store.PREFIX):].split(":", 1)
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    config["models"] = [tag]  # the one place the Bento learns which model it carries
    with tempfile.TemporaryDirectory() as tmp:
        bentofile = Path(tmp) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(config, sort_keys=False))
        out = subprocess.run([bentoml_cli(), "build", "-f", str(bentofile), "--label", f"model={name}",
                              "--label", f"model_version={version}", "-o", "tag", str(ROOT)],
                             cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bentoml build failed:\n{out.stdout}\n{out.stderr}")
    bento = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    print(f"built Bento {bento} carrying {tag}")
    return bento


def engine() -> str | None:
    """The first container engine that answers, or None."""
    for cmd in (["docker", "info"], ["podman", "info"], ["nerdctl", "info"], ["buildctl", "debug", "workers"]):
        if shutil.which(cmd[0]):
            if subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0:
                return cmd[0]
    return None


def containerize(tag: str | None = None) -> None:
    tag = tag or build()
    backend = engine()
    if backend is None:
        sys.exit(f"no container engine answers on this machine (tried docker, podman, nerdctl, buildctl). "
                 f"The Bento {tag} is built; its Dockerfile is at "
                 f"$(bentoml get {tag} -o path)/env/docker/Dockerfile. Run `bentoml containerize {tag}` "
                 "where Docker or another engine runs.")
    subprocess.run([bentoml_cli(), "containerize", tag, "--backend", backend, "-t", f"imgclf:{tag.split(':')[-1]}"],
                   cwd=ROOT, check=True)


def main(argv: list[str]) -> None:
    """Errors a user can fix (no version, a corrupt one, no bentoml) are one line, never a traceback."""
    try:
        if argv[:1] == ["build"] and len(argv) == 1:
            build()
        elif argv[:1] == ["containerize"] and len(argv) <= 2:
            containerize(*argv[1:])
        else:
            sys.exit("usage: python -m deploy.bento build | containerize [BENTO_TAG]")
    except artifacts.ArtifactError as e:
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:  # the bentoml script (or a container engine) is not where we run it
        sys.exit(f"error: {e.filename or e} not found: run `make setup` (BentoML is pinned in requirements.txt)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: {' '.join(map(str, e.cmd))} exited with {e.returncode} (its output is above)")


if __name__ == "__main__":
    main(sys.argv[1:])
