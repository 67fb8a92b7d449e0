"""Versions in BentoML's model store: `imgclf-<name>:<version>`, the artifact folder kept whole inside.

`make bento` imports the chosen version into the local model store and the Bento references it by
tag, so `bentoml models list` shows it and `bentoml models export` carries it. BentoML writes its own
model.yaml beside what a model holds, so the version's files sit one level down,
`<model path>/artifact/<name>/<version>/`, where core.artifacts verifies every hash exactly as it
does under artifacts/. Kept free of heavy imports: deploy/bento.py uses the same names.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "imgclf-"
ARTIFACT_DIR = "artifact"


def tag_for(name: str, version: str) -> str:
    return f"{PREFIX}{name}:{version}"


def artifacts_root(model_path: str | Path) -> Path:
    """The artifacts folder inside a stored model (holds <name>/<version>/)."""
    return Path(model_path) / ARTIFACT_DIR


def bento_model(src: Path) -> tuple[str, str, str] | None:
    """(artifacts dir, name, version) of the model a built Bento carries, or None outside a Bento.

    `src` is the folder holding service/ (a Bento's src/, whose parent holds bento.yaml and models/).
    """
    bento_yaml = src.parent / "bento.yaml"
    if not bento_yaml.is_file():
        return None
    import bentoml
    import yaml

    tags = [m["tag"] for m in yaml.safe_load(bento_yaml.read_text()).get("models") or []
            if str(m.get("tag", "")).startswith(PREFIX)]
    if len(tags) != 1:
        raise RuntimeError(f"{bento_yaml} names {len(tags)} {PREFIX}* models; a Bento of this service carries one")
    name, version = tags[0][len(PREFIX):].split(":", 1)
    return str(artifacts_root(bentoml.models.get(tags[0]).path)), name, version
