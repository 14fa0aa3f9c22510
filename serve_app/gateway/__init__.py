"""The chat pipeline, free of Ray and HTTP: what one /v1/chat/completions request goes
through between the edge and a model.

- builder.py          build_chat_service(settings, ports): the pipeline from settings and ports
- chat_service.py     admit -> cache -> RAG -> route/fallback -> settle, streaming or not
- cache_stage.py      exact/semantic lookup before the model, store after
- router.py           per-request routing decision, worst-case reservation, fallback chains
- request_context.py  one request's context (ids, timings, usage) and its log line
- sse.py, completions.py  the wire forms of answers (SSE events, finished completions)
"""
