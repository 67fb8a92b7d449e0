"""Shadow cost: the champion's /predict latency with SHADOW=0 and SHADOW=1 (the challenger classifying
the same images off the response path), both servers side by side with the same champion and challenger,
measured in interleaved rounds by the serving benchmark's wrk rounds (bench/serving.py), their order
rotated. Prints the medians over rounds and the SHADOW=1 / SHADOW=0 ratios (medians of per-round
ratios), and what the shadow compared and dropped. Target (issue 13): p99 up by at most 10% at c=16.

    python -m bench.shadow [--artifacts-dir artifacts] [--model-name lenet] [--challenger ALIAS_OR_VERSION]
                           [--rounds 5] [--duration 10] [--connections 16] [--workers 1]

The champion is the model's champion alias (PROMOTED), the challenger CHALLENGER's default (the
`challenger` alias) unless --challenger names one; a missing challenger is an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from bench.harness import Server, running
from bench.serving import _round


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts-dir", default="artifacts")
    ap.add_argument("--model-name", default="lenet")
    ap.add_argument("--challenger", default=None, help="CHALLENGER for both servers (default: the challenger alias)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of untimed load before each wrk run")
    ap.add_argument("--connections", type=int, nargs="+", default=[16])
    ap.add_argument("--workers", type=int, default=1, help="workers of each server")
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    body = json.dumps({"images": np.random.default_rng(0).integers(0, 256, (1, 28, 28)).tolist()}).encode()
    env = {"ARTIFACTS_DIR": str(Path(args.artifacts_dir).resolve()), "MODEL_NAME": args.model_name,
           "MODEL_VERSION": "", "RELOAD_POLL_S": "0",
           **({"CHALLENGER": args.challenger} if args.challenger else {})}
    servers = {f"shadow_{flag}": Server({**env, "SHADOW": flag}, workers=args.workers,
                                        log_path=tmp / f"shadow-{flag}.log") for flag in ("0", "1")}
    runs = []
    with running(*servers.values()):
        info = httpx.get(servers["shadow_1"].url + "/model_info", timeout=30).json()
        if not (info.get("challenger") or {}).get("model_version"):
            sys.exit(f"error: no challenger is served: {info.get('challenger')}")
        print(f"shadow benchmark: champion {info['model_version']}, challenger "
              f"{info['challenger']['model_version']}, {args.workers} worker(s) per server", flush=True)
        for rnd in range(1, args.rounds + 1):
            runs.extend(_round(servers, rnd, args, body))
        shadowed = _shadow_counts(servers["shadow_1"].url)
    result = summarise(runs, args.connections, shadowed)
    print(table(result))
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _shadow_counts(url: str) -> dict:
    """Images the SHADOW=1 server compared (agreeing or not) and dropped."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {"agree": 0.0, "disagree": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        if line.startswith("imgclf_shadow_agreement_total{"):
            out["agree" if 'agree="true"' in line else "disagree"] += float(line.split()[-1])
        elif line.startswith("imgclf_shadow_dropped_total "):
            out["dropped"] = float(line.split()[-1])
    return out


def summarise(runs: list[dict], connections: list[int], shadowed: dict) -> dict:
    """Per connection count: median p50/p99/req/s of each side, and the medians of per-round ratios on/off."""
    out = {"shadowed": shadowed, "by_connections": {}}
    for c in connections:
        side = {t: [r for r in runs if r["connections"] == c and r["target"] == t] for t in ("shadow_0", "shadow_1")}
        row = {t: {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p99_ms", "requests_per_s")}
               for t, rs in side.items()}
        pairs = list(zip(side["shadow_0"], side["shadow_1"]))  # the same round, in order
        row["ratio"] = {k: statistics.median(on[k] / off[k] for off, on in pairs)
                        for k in ("p50_ms", "p99_ms", "requests_per_s")}
        row["non_2xx"] = sum(r["non_2xx"] for rs in side.values() for r in rs)
        out["by_connections"][c] = row
    return out


def table(res: dict) -> str:
    lines = ["| c | SHADOW | p50 ms | p99 ms | req/s |", "| --- | --- | --- | --- | --- |"]
    for c, row in res["by_connections"].items():
        for t in ("shadow_0", "shadow_1"):
            f = row[t]
            lines.append(f"| {c} | {t[-1]} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['requests_per_s']:.0f} |")
        r = row["ratio"]
        lines.append(f"| {c} | 1 / 0 | {r['p50_ms']:.2f}x | {r['p99_ms']:.2f}x | {r['requests_per_s']:.2f}x |")
    s = res["shadowed"]
    lines.append(f"\nshadow (SHADOW=1 server): {s['agree'] + s['disagree']:.0f} images compared "
                 f"({s['agree']:.0f} agreeing), {s['dropped']:.0f} dropped; non-2xx: "
                 f"{sum(row['non_2xx'] for row in res['by_connections'].values())}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
