"""`make bento` and `make containerize`.

    python -m deploy.bento build         # stage the chosen version into bundle/, then `bentoml build`
    python -m deploy.bento containerize [TAG]  # `bentoml containerize` where a container engine answers

The version is chosen as the service chooses it (ARTIFACTS_DIR, MODEL_NAME, MODEL_VERSION;
promoted else newest) and verified before it is copied. In the Bento the service finds
bundle/bundle.json and serves exactly that version, whatever ARTIFACTS_DIR says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from core import artifacts

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "bundle"


def stage(root: str, name: str, version: str | None) -> tuple[str, str]:
    folder = artifacts.resolve(root, name, version)
    artifacts.verify(folder)
    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    dest = BUNDLE / "artifacts" / name / folder.name
    shutil.copytree(folder, dest)
    (BUNDLE / "bundle.json").write_text(json.dumps({"name": name, "version": folder.name}) + "\n")
    return name, folder.name


def bentoml_cli() -> str:
    return str(Path(sys.executable).with_name("bentoml"))


def build() -> str:
    name, version = stage(os.environ.get("ARTIFACTS_DIR", "artifacts"), os.environ.get("MODEL_NAME", "cnn"),
                          os.environ.get("MODEL_VERSION") or None)
    print(f"bundling {name}/{version}")
    try:
        out = subprocess.run([bentoml_cli(), "build", "-f", "bentofile.yaml", "--label", f"model={name}",
                              "--label", f"model_version={version}", "-o", "tag"],
                             cwd=ROOT, capture_output=True, text=True)
    finally:
        # the staged copy is only for the build: left here, `make serve` would serve it
        shutil.rmtree(BUNDLE, ignore_errors=True)
    if out.returncode != 0:
        sys.exit(f"bentoml build failed:\n{out.stdout}\n{out.stderr}")
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    print(f"built Bento {tag} carrying {name}/{version}")
    return tag


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
