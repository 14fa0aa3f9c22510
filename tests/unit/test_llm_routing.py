"""LocalLLM's prefix-aware router reads the prompt of the project's dict requests."""
from __future__ import annotations

from types import SimpleNamespace

from deployments.llm_routing import PromptPrefixRouter, prompt_of


def test_the_prompt_comes_from_a_dict_request_or_a_request_object() -> None:
    messages = [{"role": "system", "content": "You are the hotel's assistant."},
                {"role": "user", "content": "Open?"}]
    assert prompt_of(({"model": "m", "messages": messages}, "request-id")) == messages
    assert prompt_of((SimpleNamespace(prompt="Once upon"),)) == "Once upon"
    assert prompt_of(("request-id",)) is None


def test_the_router_turns_the_messages_into_one_prefix_string() -> None:
    router = PromptPrefixRouter.__new__(PromptPrefixRouter)  # no Serve internals needed
    request = {"messages": [{"role": "system", "content": "Long shared prefix. "},
                            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    pending = SimpleNamespace(args=[request, "rid"], kwargs={})
    assert router._extract_text_from_request(pending) == "Long shared prefix. Hi"
    assert router._extract_text_from_request(SimpleNamespace(args=[], kwargs={})) == ""
