"""`make serve`: python -m service.cli serve [--port 3000] [--host 0.0.0.0]

Settings come from the environment (see service/service.py); WORKERS sets the worker processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m service.cli", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the chosen version with BentoML")
    s.add_argument("--port", type=int, default=int(os.environ.get("PORT", 3000)))
    s.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    args = ap.parse_args(argv)
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [bentoml, "serve", "service.service:ImageClassifier", "--port", str(args.port), "--host", args.host,
           "--working-dir", str(ROOT)]
    os.execve(bentoml, cmd, env)  # replace this process: signals reach bentoml directly


if __name__ == "__main__":
    main()
