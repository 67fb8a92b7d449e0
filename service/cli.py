"""`make serve`: python -m service.cli serve [--port 3000] [--host 0.0.0.0]

Settings come from the environment (service/settings.py; `serve --help` lists them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service import settings

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Start `bentoml serve` in place of this process; a bad setting or a missing BentoML is one line and exit 2."""
    ap = argparse.ArgumentParser(prog="python -m service.cli", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the chosen version with BentoML",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="settings (environment variables, default, meaning):\n" + settings.describe())
    s.add_argument("--port", type=int, help="default: PORT, else 3000")
    s.add_argument("--host", help="default: HOST, else 0.0.0.0")
    args = ap.parse_args(argv)
    try:
        cfg = settings.read()  # the environment as it is now: a bad setting is refused before BentoML starts
    except settings.SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    if not Path(bentoml).is_file():
        print(f"error: {bentoml} not found: run `make setup` (BentoML is pinned in requirements.txt)", file=sys.stderr)
        return 2
    cmd = [bentoml, "serve", "service.service:ImageClassifier", "--port", str(args.port or cfg.port),
           "--host", args.host or cfg.host, "--working-dir", str(ROOT)]
    os.execve(bentoml, cmd, settings.serve_environment(ROOT))  # replace this process: signals reach bentoml directly
    return 0  # not reached: execve does not return


if __name__ == "__main__":
    sys.exit(main())
