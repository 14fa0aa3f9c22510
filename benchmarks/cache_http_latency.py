"""Latency of a semantic-cache hit versus a miss answered by the local model, through the
HTTP API (openai SDK path: Gateway -> embedder -> cache -> vLLM), in one run.

For each GPTCache pair (origin, paraphrase): ask the origin (a miss: the model answers and
the answer is stored), ask it again (an exact hit), ask the paraphrase (a semantic hit, or
a miss when the calibrated threshold and guard refuse it). Medians and the hit/miss ratio;
writes benchmarks/results/cache_http_latency.json.

    python -m benchmarks.cache_http_latency [--pairs 40] [--data-dir ../shared/data]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from benchmarks.common import median, percentile, start_stack, write_result
from serve_app.settings import PROJECT_ROOT

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--data-dir", type=Path, default=PROJECT_ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    lines = (args.data_dir / "cache" / "gptcache_mock_paraphrases.jsonl").read_text().splitlines()
    step = max(1, len(lines) // args.pairs)
    pairs = [json.loads(line) for line in lines[::step][:args.pairs]]
    stack, key = start_stack({"cache": {"flush_interval_s": 0.1}})
    samples: dict[str, list[float]] = {"miss": [], "exact_hit": [], "semantic_hit": [],
                                       "paraphrase_miss": []}
    try:
        with httpx.Client(base_url=stack.base_url, timeout=300,
                          headers={"authorization": f"Bearer {key}"}) as http:
            def ask(question: str) -> tuple[float, str]:
                started = time.perf_counter()
                response = http.post("/v1/chat/completions", json={
                    "model": MODEL, "temperature": 0, "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": question}]})
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                return elapsed, response.headers["x-cache"]

            ask("warm-up question")
            for pair in pairs:
                elapsed, state = ask(pair["origin"])
                if state == "miss":
                    samples["miss"].append(elapsed)
                time.sleep(0.2)  # the store is batched; let it land
                elapsed, state = ask(pair["origin"])
                if state == "hit":
                    samples["exact_hit"].append(elapsed)
                elapsed, state = ask(pair["similar"])
                samples["semantic_hit" if state == "hit" else "paraphrase_miss"].append(elapsed)
    finally:
        stack.shutdown()
    summary = {name: {"n": len(values), "median_ms": median(values),
                      "p90_ms": percentile(values, 90)} for name, values in samples.items()}
    ratios = {
        "exact_hit_over_miss": summary["exact_hit"]["median_ms"] / summary["miss"]["median_ms"],
        "semantic_hit_over_miss":
            summary["semantic_hit"]["median_ms"] / summary["miss"]["median_ms"]
            if samples["semantic_hit"] else None,
        "paraphrase_hit_rate": len(samples["semantic_hit"]) / len(pairs),
    }
    path = write_result("cache_http_latency", {
        "config": {"pairs": len(pairs), "max_tokens": args.max_tokens, "model": MODEL,
                   "path": "HTTP -> Gateway (auth, quota, ledger) -> embed -> cache -> vLLM"},
        "summary": summary, "ratios": ratios})
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
