"""Single-stream tokens/s and time to first token through the gateway (HTTP, Ray Serve,
openai SDK) versus the same vLLM engine class called directly, interleaved in one run.

    python -m benchmarks.gateway_overhead [--rounds 10] [--max-tokens 64]

Both sides generate exactly --max-tokens tokens (ignore_eos) greedily from the same prompt.
Reports medians and the gateway/direct ratios; writes benchmarks/results/gateway_overhead.json.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time

from benchmarks.common import median, start_stack, write_result

PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def _stats(ttft_s: float, total_s: float, tokens: int) -> dict[str, float]:
    decode = total_s - ttft_s
    return {"ttft_s": ttft_s, "total_s": total_s,
            "tokens_per_s": (tokens - 1) / decode if decode > 0 and tokens > 1 else float("nan")}


async def direct_round(engine, max_tokens: int, index: int) -> dict[str, float]:
    from serve_app.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
         "ignore_eos": True, "stream": True})
    started = time.perf_counter()
    ttft = None
    tokens = 0
    async for chunk in engine.chat_stream(request, f"bench-direct-{index}"):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
            ttft = time.perf_counter() - started
    return {**_stats(ttft or float("nan"), time.perf_counter() - started, tokens), "tokens": tokens}


async def gateway_round(client, model: str, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    ttft = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].delta.content and ttft is None:
            ttft = time.perf_counter() - started
    return {**_stats(ttft or float("nan"), time.perf_counter() - started, tokens), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from openai import AsyncOpenAI

    from serve_app.llm.vllm_engine import VLLMChatEngine
    from serve_app.model_prep import ensure_default_model
    from serve_app.settings import PROJECT_ROOT, LocalLLMSettings

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    stack, api_key = start_stack()
    settings = LocalLLMSettings()
    engine = VLLMChatEngine(settings, str(ensure_default_model(PROJECT_ROOT / "var")))
    engine.start()

    async def run() -> dict[str, list[dict[str, float]]]:
        results: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key,
                               max_retries=0, timeout=300) as client:
            # warm both paths
            await direct_round(engine, 8, -1)
            await gateway_round(client, settings.served_name, 8)
            for index in range(args.rounds):
                order = ["direct", "gateway"] if index % 2 == 0 else ["gateway", "direct"]
                for side in order:
                    if side == "direct":
                        results[side].append(await direct_round(engine, args.max_tokens, index))
                    else:
                        results[side].append(await gateway_round(client, settings.served_name,
                                                                 args.max_tokens))
        return results

    try:
        results = asyncio.run(run())
    finally:
        engine.shutdown()
        stack.shutdown()
    summary = {side: {metric: median([r[metric] for r in rows])
                      for metric in ("ttft_s", "total_s", "tokens_per_s")}
               for side, rows in results.items()}
    ratios = {
        "ttft_gateway_over_direct": summary["gateway"]["ttft_s"] / summary["direct"]["ttft_s"],
        "tokens_per_s_gateway_over_direct":
            summary["gateway"]["tokens_per_s"] / summary["direct"]["tokens_per_s"],
        "total_gateway_over_direct": summary["gateway"]["total_s"] / summary["direct"]["total_s"],
        "ttft_added_ms": (summary["gateway"]["ttft_s"] - summary["direct"]["ttft_s"]) * 1000,
    }
    path = write_result("gateway_overhead", {
        "config": {"rounds": args.rounds, "max_tokens": args.max_tokens,
                   "model": settings.served_name},
        "median": summary, "ratios": ratios, "rounds": results})
    print(f"median direct : {summary['direct']}")
    print(f"median gateway: {summary['gateway']}")
    print(f"ratios        : {ratios}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
