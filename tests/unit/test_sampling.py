import pytest

from serve_app.errors import ApiError
from serve_app.llm.sampling import finish_reason, plan_generation
from serve_app.protocol import ChatCompletionRequest


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def plan(req, prompt_tokens=10, max_model_len=100, default_max_tokens=32):
    return plan_generation(req, prompt_tokens=prompt_tokens, max_model_len=max_model_len,
                           default_max_tokens=default_max_tokens)


def test_openai_parameters_map_to_sampling():
    result = plan(request(temperature=0.2, top_p=0.9, max_tokens=7, stop="END", seed=3,
                          presence_penalty=0.5, frequency_penalty=-0.5))
    assert result.sampling == {"n": 1, "temperature": 0.2, "top_p": 0.9, "max_tokens": 7,
                               "stop": ["END"], "seed": 3, "presence_penalty": 0.5,
                               "frequency_penalty": -0.5, "min_tokens": 0,
                               "ignore_eos": False}


def test_openai_defaults_apply_when_unset():
    result = plan(request())
    assert result.sampling["temperature"] == 1.0 and result.sampling["top_p"] == 1.0
    assert result.sampling["stop"] is None and result.sampling["seed"] is None


def test_max_completion_tokens_wins_over_max_tokens():
    assert plan(request(max_tokens=50, max_completion_tokens=5)).max_tokens == 5


def test_default_max_tokens_is_clamped_to_the_room_left():
    assert plan(request(), prompt_tokens=90, max_model_len=100, default_max_tokens=32).max_tokens == 10


def test_explicit_max_tokens_that_does_not_fit_is_a_400_naming_max_tokens():
    with pytest.raises(ApiError) as caught:
        plan(request(max_tokens=91), prompt_tokens=10, max_model_len=100)
    assert caught.value.status == 400 and caught.value.param == "max_tokens"
    assert caught.value.code == "context_length_exceeded"


def test_prompt_filling_the_context_is_a_400_naming_messages():
    with pytest.raises(ApiError) as caught:
        plan(request(), prompt_tokens=100, max_model_len=100)
    assert caught.value.param == "messages" and "100 tokens" in caught.value.message


def test_n_above_one_is_rejected():
    with pytest.raises(ApiError) as caught:
        plan(request(n=3))
    assert caught.value.param == "n"


def test_min_tokens_never_exceeds_max_tokens():
    assert plan(request(max_tokens=4, min_tokens=10)).sampling["min_tokens"] == 4


def test_more_than_four_stop_sequences_fail_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        request(stop=["a", "b", "c", "d", "e"])


@pytest.mark.parametrize("vllm,openai", [("stop", "stop"), ("length", "length"),
                                          ("abort", "stop"), (None, None)])
def test_finish_reasons(vllm, openai):
    assert finish_reason(vllm) == openai
