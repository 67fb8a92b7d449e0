"""`make bench`: every benchmark in one run, each printing its table and saving JSON (+ PNG) in bench/results/.

    python -m bench [serving|training ...]   (default: all)
Serving needs a LeNet version (`make train MODEL=lenet`); the results compare ratios measured
in the same run, since client and servers share this machine's cores.
"""

import sys


def main(argv: list[str]) -> None:
    which = argv or ["training", "serving"]
    unknown = sorted(set(which) - {"training", "serving"})
    if unknown:
        sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; known: training, serving")
    if "training" in which:
        from bench import train_throughput
        train_throughput.main([])
    if "serving" in which:
        from bench import serving
        serving.main([])


if __name__ == "__main__":
    main(sys.argv[1:])
