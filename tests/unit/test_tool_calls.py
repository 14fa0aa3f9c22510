import json

import pytest

from serve_app.errors import ApiError
from serve_app.llm.tool_calls import ToolCallFormat
from serve_app.protocol import ChatCompletionRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}}}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "weather in Oslo?"}], **fields})


def test_no_tools_or_tool_choice_none_means_plain_chat():
    assert ToolCallFormat.for_request(request()) is None
    assert ToolCallFormat.for_request(request(tools=[WEATHER], tool_choice="none")) is None


def test_auto_allows_a_plain_answer_required_does_not():
    auto = ToolCallFormat.for_request(request(tools=[WEATHER, TIME]))
    assert "anyOf" in auto.output_schema() and not auto.required
    required = ToolCallFormat.for_request(request(tools=[WEATHER], tool_choice="required"))
    assert required.output_schema()["required"] == ["tool_calls"]


def test_named_tool_choice_restricts_the_schema_to_it():
    fmt = ToolCallFormat.for_request(request(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_time"}}))
    variants = fmt.output_schema()["properties"]["tool_calls"]["items"]["anyOf"]
    assert [v["properties"]["name"]["const"] for v in variants] == ["get_time"]


def test_unknown_named_tool_is_a_400():
    with pytest.raises(ApiError) as caught:
        ToolCallFormat.for_request(request(tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "nope"}}))
    assert caught.value.param == "tool_choice"


def test_parse_tool_calls_into_openai_shape():
    fmt = ToolCallFormat.for_request(request(tools=[WEATHER]))
    message, reason = fmt.parse_output(
        json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}),
        "stop")
    assert reason == "tool_calls" and message["content"] is None
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_parse_plain_answer_and_truncated_output():
    fmt = ToolCallFormat.for_request(request(tools=[WEATHER]))
    assert fmt.parse_output('{"content": "Sunny"}', "stop") == (
        {"role": "assistant", "content": "Sunny"}, "stop")
    message, reason = fmt.parse_output('{"tool_calls": [{"na', "length")
    assert reason == "length" and message["content"].startswith("{")


def test_history_with_tool_traffic_is_flattened_for_plain_templates():
    fmt = ToolCallFormat.for_request(request(tools=[WEATHER]))
    messages = fmt.prompt_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12C"},
    ])
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert messages[0]["content"].startswith("Be brief.")
    assert json.loads(messages[2]["content"])["tool_calls"][0]["arguments"] == {"city": "Oslo"}
    assert messages[3]["role"] == "user" and "12C" in messages[3]["content"]


def test_repeated_calls_are_capped_deduplicated_and_truncation_keeps_complete_calls():
    fmt = ToolCallFormat.for_request(request(tools=[WEATHER, TIME]))
    schema = fmt.output_schema()["anyOf"][0]["properties"]["tool_calls"]
    assert schema["maxItems"] == 4
    args_schema = schema["items"]["anyOf"][0]["properties"]["arguments"]
    assert args_schema["additionalProperties"] is False
    repeated = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                          {"name": "get_weather", "arguments": {"city": "Oslo"}},
                                          {"name": "get_time", "arguments": {}}]})
    message, reason = fmt.parse_output(repeated, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    cut = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_we'
    message, reason = fmt.parse_output(cut, "length")
    assert reason == "tool_calls" and len(message["tool_calls"]) == 1
