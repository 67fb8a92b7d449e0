"""`make bench`: every benchmark in one run, each printing its table and saving JSON (+ PNG) in bench/results/.

    python -m bench [serving|training ...]   (default: all)
Serving benchmarks BENCH_MODEL, else lenet when it has a version, else the model `make train` made
(MODEL_NAME, cnn by default); the results compare ratios measured in the same run, since client and
servers share this machine's cores. A missing version or dataset is one line saying what to run.
"""

import sys


def main(argv: list[str]) -> None:
    which = argv or ["training", "serving"]
    unknown = sorted(set(which) - {"training", "serving"})
    if unknown:
        sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; known: training, serving")
    from core.artifacts import ArtifactError
    from training.data import DataNotFound

    try:
        if "training" in which:
            from bench import train_throughput
            train_throughput.main([])
        if "serving" in which:
            from bench import serving
            serving.main([])
    except (ArtifactError, DataNotFound) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
