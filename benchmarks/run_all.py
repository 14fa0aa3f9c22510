"""Run every benchmark module that exists, each with small/quick settings (`make bench`).

Each module runs in its own process (`python -m benchmarks.<name> ...`), one after the
other (each starts its own Ray cluster or model), and a failure does not stop the rest.
Quick settings overwrite that benchmark's JSON in benchmarks/results/ unless the module
takes a result name (then `_quick` is appended); run a module alone, without arguments,
for the numbers the README reports.

    python -m benchmarks.run_all [--only NAME ...] [--skip NAME ...] [--list]
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

# module -> quick arguments (the order is the order they run in)
QUICK: dict[str, list[str]] = {
    "cache_calibration": [],
    "cache_verifier": ["--repeats", "1", "--latency-queries", "100", "--latency-rounds", "1",
                       "--result-name", "cache_verifier_quick"],
    "cache_store_latency": ["--sizes", "5000", "--lookups", "50"],
    "router_benchmark": [],
    "router_loso": ["--max-per-source", "60", "--bootstrap", "50",
                    "--result-name", "router_loso_quick"],
    "rag_cranfield": ["--smoke", "--result-name", "rag_cranfield_quick"],
    "gateway_overhead": ["--rounds", "3", "--max-tokens", "16"],
    "quota_overhead": ["--rounds", "10"],
    "quota_scaling": ["--seconds", "1", "--rounds", "1", "--shards", "1", "2",
                      "--result-name", "quota_scaling_quick"],
    "cache_http_latency": ["--pairs", "10"],
    "rag_http_latency": ["--synthetic-chunks", "5000", "--queries", "20"],
    "bfcl_benchmark": ["--limit", "5", "--result-name", "bfcl_quick"],
    "gateway_vs_litellm": ["--quick", "--result-name", "gateway_vs_litellm_quick"],
    "prefix_routing": ["--requests", "24", "--result-name", "prefix_routing_quick"],
    "load": ["--phases", "4:10", "8:15", "--kill-worker-at", "12",
             "--result-name", "load_quick"],
}


def available() -> list[str]:
    return [name for name in QUICK if importlib.util.find_spec(f"benchmarks.{name}")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--skip", nargs="+", default=[])
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    names = [n for n in available() if (args.only is None or n in args.only)
             and n not in args.skip]
    if args.list:
        for name in names:
            print(name, " ".join(QUICK[name]))
        return 0
    outcomes: list[tuple[str, int, float]] = []
    for name in names:
        command = [sys.executable, "-m", f"benchmarks.{name}", *QUICK[name]]
        print(f"\n=== {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.call(command)
        outcomes.append((name, code, time.monotonic() - started))
    print("\n=== summary")
    for name, code, seconds in outcomes:
        print(f"{'ok  ' if code == 0 else 'FAIL'} {name} ({seconds:.0f} s)")
    failed = [name for name, code, _ in outcomes if code != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
