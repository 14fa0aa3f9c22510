"""Added latency of the gateway features (API key auth + quota admission + durable ledger
row) per request, against the same path with them off, side by side in one run.

Two stack apps share the models: `stack` (features on, at /) and `stack_off`
(quota.enabled: false, at /off). Requests alternate between them; one-token chat
completions keep the model's share small so the gateway's own cost is visible.

    python -m benchmarks.quota_overhead [--rounds 60]
"""
from __future__ import annotations

import argparse
import time

import httpx

from benchmarks.common import median, percentile, start_stack, write_result

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    stack, key = start_stack(extra_stacks={"stack_off": ("/off", {"quota": {"enabled": False}})})
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}]}
    paths = {"on": ("", {"authorization": f"Bearer {key}"}), "off": ("/off", {})}
    samples: dict[str, dict[str, list[float]]] = {
        side: {"chat": [], "models": []} for side in paths}
    try:
        with httpx.Client(base_url=stack.base_url, timeout=120) as http:
            for side, (prefix, headers) in paths.items():  # warm-up
                http.post(f"{prefix}/v1/chat/completions", json=body, headers=headers)
            for index in range(args.rounds):
                order = list(paths) if index % 2 == 0 else list(reversed(paths))
                for side in order:
                    prefix, headers = paths[side]
                    for name, call in (
                        ("chat", lambda: http.post(f"{prefix}/v1/chat/completions", json=body,
                                                   headers=headers)),
                        ("models", lambda: http.get(f"{prefix}/v1/models", headers=headers)),
                    ):
                        started = time.perf_counter()
                        response = call()
                        elapsed = time.perf_counter() - started
                        response.raise_for_status()
                        samples[side][name].append(elapsed * 1000)
    finally:
        stack.shutdown()
    summary = {side: {name: {"median_ms": median(v), "p90_ms": percentile(v, 90)}
                      for name, v in by_route.items()} for side, by_route in samples.items()}
    ratios = {name: {
        "on_over_off": summary["on"][name]["median_ms"] / summary["off"][name]["median_ms"],
        "added_ms": summary["on"][name]["median_ms"] - summary["off"][name]["median_ms"]}
        for name in ("chat", "models")}
    path = write_result("quota_overhead", {
        "config": {"rounds": args.rounds, "request": "chat max_tokens=1; GET /v1/models"},
        "summary": summary, "ratios": ratios})
    print(summary)
    print(ratios)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
