"""`imgclf`: the project's one command, a thin dispatcher over the two CLIs (installed by `make setup`).

    imgclf train [flags]                 python -m training train     (train, publish a version)
    imgclf cv | list | aliases | promote | rollback | compare ...      python -m training ...
    imgclf serve [--port P] [--host H]   python -m service.cli serve  (BentoML, settings from the environment)

Every flag after the command goes to that CLI unchanged, so `imgclf train --help` is
`python -m training train --help`; exit codes are theirs. This module sits beside the packages, not in
one: it depends on both halves, and core/ is the layer both halves (and the Bento) import.
"""

from __future__ import annotations

import sys

# command -> (the CLI that runs it, what it does); training and service are imported only when used,
# so `imgclf --help` answers at once
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training", "train a model and publish a new artifact version"),
    "cv": ("training", "k-fold cross-validation on the training set; writes a report"),
    "list": ("training", "list published versions (* marks the champion, aliases in brackets)"),
    "aliases": ("training", "the aliases of a model and their versions"),
    "promote": ("training", "point an alias at a version (champion is gated by a paired test); logged"),
    "rollback": ("training", "point an alias back at its previous holder by the promotion log"),
    "compare": ("training", "paired comparison of two versions on the same test images (McNemar)"),
    "serve": ("service.cli", "serve the champion (or MODEL_VERSION) of MODEL_NAME with BentoML"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: imgclf COMMAND [flags]   (imgclf COMMAND --help lists its flags)\n\n"
            f"Train image classifiers into hashed, versioned artifacts and serve them with BentoML.\n\n"
            f"commands:\n{rows}\n\n"
            f"The same as `python -m training COMMAND` and `python -m service.cli serve`; make targets: README.md.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; known: {', '.join(COMMANDS)} (imgclf --help)", file=sys.stderr)
        return 2
    if COMMANDS[command][0] == "service.cli":
        from service.cli import main as serve
        return serve(["serve", *rest])  # replaces this process with `bentoml serve`, or one error line and 2
    from training.__main__ import main as training
    return training([command, *rest])


if __name__ == "__main__":
    sys.exit(main())
