"""vLLM behind a small chat interface. Knows no HTTP and no Ray.

Convention (as in ray.serve.llm's engine protocol): `chat` returns an OpenAI completion dict
or an error payload; `chat_stream` yields OpenAI chunk dicts and, on failure, one error
payload. The last chunk of every stream carries `usage` (the gateway decides whether the
client sees it).
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from serve_app.gateway.completions import completion_as_chunks
from serve_app.errors import ApiError
from serve_app.llm.prompt import template_messages
from serve_app.llm.sampling import GenerationPlan, finish_reason, plan_generation
from serve_app.llm.tool_calls import ToolCallFormat
from serve_app.protocol import ChatCompletionRequest, now
from serve_app.settings import LocalLLMSettings

logger = logging.getLogger(__name__)


class VLLMChatEngine:
    def __init__(self, settings: LocalLLMSettings, model_path: str) -> None:
        self.settings = settings
        self.model_path = model_path
        self.engine: Any = None
        self.tokenizer: Any = None
        self._running: set[str] = set()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_space_gb))
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path,
            served_model_name=self.settings.served_name,
            dtype=self.settings.dtype,
            max_model_len=self.settings.max_model_len,
            enforce_eager=self.settings.enforce_eager,
            seed=self.settings.seed,
            gpu_memory_utilization=self.settings.gpu_memory_utilization,
            tensor_parallel_size=self.settings.tensor_parallel_size,
            max_num_seqs=self.settings.max_num_seqs,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def check_health(self) -> None:
        if self.engine is None or self.engine.errored:
            raise RuntimeError("vLLM engine is not running")
        await self.engine.check_health()

    def model_info(self) -> dict[str, Any]:
        return {"id": self.settings.served_name, "object": "model", "created": 0,
                "owned_by": "local-vllm", "max_model_len": self.settings.max_model_len,
                "default_max_tokens": self.settings.default_max_tokens}

    def running_requests(self) -> int:
        return len(self._running)

    # ----------------------------------------------------------------- prompts
    def prompt_token_ids(self, request: ChatCompletionRequest) -> list[int]:
        # The same messages the gateway's LocalPromptTokenizer counts for reservations.
        messages = template_messages(request)
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(encoded, dict) or hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        return list(encoded)

    def _prepare(self, request: ChatCompletionRequest, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        prompt_ids = self.prompt_token_ids(request)
        plan: GenerationPlan = plan_generation(
            request,
            prompt_tokens=len(prompt_ids),
            max_model_len=self.settings.max_model_len,
            default_max_tokens=self.settings.default_max_tokens,
        )
        structured = None
        tools = ToolCallFormat.for_request(request)
        if tools is not None:
            structured = StructuredOutputsParams(json=tools.output_schema())
        elif request.response_format:
            structured = _structured_from_response_format(request.response_format,
                                                          StructuredOutputsParams)
        params = SamplingParams(
            **plan.sampling,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=structured,
        )
        return prompt_ids, params, tools

    # ----------------------------------------------------------------- generation
    async def chat(self, request: ChatCompletionRequest, request_id: str) -> dict[str, Any]:
        try:
            prompt_ids, params, tools = self._prepare(request, stream=False)
        except ApiError as error:
            return error.to_payload()
        except Exception as exc:  # what vLLM refuses to build from the request is a 400
            return _invalid_request(exc).to_payload()
        final = None
        self._running.add(request_id)
        try:
            async for output in self.engine.generate(
                {"prompt_token_ids": prompt_ids}, params, request_id=request_id
            ):
                final = output
        except asyncio.CancelledError:
            await self._abort(request_id)
            raise
        except _REQUEST_ERRORS as exc:  # vLLM validates the request as it adds it
            if final is None and not self.engine.errored:
                return _invalid_request(exc).to_payload()
            logger.exception("vLLM generate failed for %s", request_id)
            return _engine_failure(exc).to_payload()
        except Exception as exc:  # engine failure: the client gets a 503, we get the log
            logger.exception("vLLM generate failed for %s", request_id)
            return _engine_failure(exc).to_payload()
        finally:
            self._running.discard(request_id)
        completion = final.outputs[0]
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        reason = finish_reason(completion.finish_reason)
        if tools is not None:
            message, reason = tools.parse_output(completion.text, reason)
        completion_tokens = len(completion.token_ids)
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": now(),
            "model": self.settings.served_name,
            "choices": [{"index": 0, "message": message, "finish_reason": reason,
                         "logprobs": None}],
            "usage": _usage(len(prompt_ids), completion_tokens),
        }

    async def chat_stream(
        self, request: ChatCompletionRequest, request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            prompt_ids, params, tools = self._prepare(request, stream=True)
        except ApiError as error:
            yield error.to_payload()
            return
        except Exception as exc:
            yield _invalid_request(exc).to_payload()
            return
        if tools is not None:
            # Tool calls must be parsed whole; run to the end and emit it as chunks.
            result = await self.chat(request, request_id)
            for chunk in completion_as_chunks(result):
                yield chunk
            return
        completion_id = f"chatcmpl-{request_id}"
        created = now()
        completion_tokens = 0
        finished = False
        self._running.add(request_id)

        def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.settings.served_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason,
                                 "logprobs": None}]}

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for output in self.engine.generate(
                {"prompt_token_ids": prompt_ids}, params, request_id=request_id
            ):
                piece = output.outputs[0]
                completion_tokens += len(piece.token_ids)
                reason = finish_reason(piece.finish_reason) if output.finished else None
                if piece.text or reason:
                    yield chunk({"content": piece.text} if piece.text else {}, reason)
                finished = output.finished
            final = chunk({}, None)
            final["choices"] = []
            final["usage"] = _usage(len(prompt_ids), completion_tokens)
            yield final
        except (asyncio.CancelledError, GeneratorExit):
            await self._abort(request_id)
            raise
        except _REQUEST_ERRORS as exc:
            if completion_tokens == 0 and not self.engine.errored:
                yield _invalid_request(exc).to_payload()
            else:
                logger.exception("vLLM stream failed for %s", request_id)
                yield _engine_failure(exc).to_payload()
        except Exception as exc:
            logger.exception("vLLM stream failed for %s", request_id)
            yield _engine_failure(exc).to_payload()
        finally:
            self._running.discard(request_id)
            if not finished:
                await self._abort(request_id)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # the engine may already have forgotten it
            logger.debug("abort of %s ignored", request_id, exc_info=True)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# What vLLM raises for a request it will not run (bad sampling values, a schema its
# grammar compiler refuses): the client's fault, so 400 and no fallback.
_REQUEST_ERRORS = (ValueError, TypeError, OverflowError)


def _invalid_request(exc: Exception) -> ApiError:
    logger.info("request refused by vLLM: %s: %s", type(exc).__name__, str(exc)[:300])
    return ApiError(400, f"The model cannot run this request: {str(exc)[:300]}",
                    code="invalid_request")


def _engine_failure(exc: Exception) -> ApiError:
    return ApiError(503, "The local model engine failed while generating; retry the request.",
                    code="engine_unavailable")


def _structured_from_response_format(fmt: dict[str, Any], params_cls: Any) -> Any:
    kind = fmt.get("type")
    if kind == "json_object":
        return params_cls(json_object=True)
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be an object",
                           param="response_format")
        return params_cls(json=schema)
    if kind in (None, "text"):
        return None
    raise ApiError(400, f"unsupported response_format type {kind!r}", param="response_format")
