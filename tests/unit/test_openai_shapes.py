"""The OpenAI surface's own shapes: body decoding errors, responses, stream chunks, logprobs.
Turning a body into requests is tested in test_gateway_shaping."""

import pytest

from dlora.services.gateway import logprobs, openai
from dlora.services.gateway.call_ids import tool_call_id
from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.openai import APIError, CompletionBody


def test_decode_errors_are_400_with_the_reason() -> None:
    with pytest.raises(APIError, match="malformed JSON") as e:
        openai.decode_body(b"{", CompletionBody)
    assert e.value.status == 400
    with pytest.raises(APIError, match="max_tokens"):
        openai.decode_body(b'{"model": "m", "prompt": "x", "max_tokens": "3"}', CompletionBody)


def test_response_shapes() -> None:
    chat, text = Shape.new(True, "chatcmpl-1", "m"), Shape.new(False, "cmpl-1", "m")
    full = chat.full([Choice(0, "hello", "stop")], 3, 2, cached_tokens=2)
    # refusal: required by the spec (null: none), sent by OpenAI and vLLM; a client validating
    # against the spec refused dlora's messages without it
    assert full["object"] == "chat.completion" and full["choices"][0]["message"] == {
        "role": "assistant",
        "content": "hello",
        "refusal": None,
    }
    assert full["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 2},  # OpenAI's, always in a response's usage
    }
    assert text.full([Choice(0, "hi", "length")], 1, 1)["choices"][0]["text"] == "hi"
    two = text.full([Choice(1, "b", "stop"), Choice(0, "a", "stop")], 1, 2)["choices"]
    assert [(c["index"], c["text"]) for c in two] == [(0, "a"), (1, "b")]
    first = chat.chunk("", None, first=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }
    assert chat.chunk("", "stop")["choices"][0]["delta"] == {}
    assert chat.chunk("", None)["choices"][0]["delta"] == {"content": ""}  # a held-back character's token
    assert text.usage_chunk(1, 2)["choices"] == []
    assert APIError(404, "no").body() == {
        "error": {"message": "no", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_logprob_objects() -> None:
    from dlora.common.messages import TokenLogprob
    from dlora.model.token_bytes import TokenIdText, TokenText
    from tests.unit.test_token_bytes import byte_level

    hf = byte_level()  # one token per byte
    tokens = TokenText(hf, len(hf))
    a, b, d = (hf.convert_tokens_to_ids(c) for c in "abd")
    entries = [TokenLogprob(a, -0.5, [(d, -0.2), (a, -0.5)]), TokenLogprob(b, -1.0, [])]
    comp = logprobs.completion_logprobs(entries, tokens, logprobs.TextOffset(4), True)
    assert comp == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"d": -0.2, "a": -0.5}, {"b": -1.0}],
        "text_offset": [4, 5],
    }
    chat = logprobs.chat_logprobs(entries, tokens)
    assert chat["content"][0] == {
        "token": "a",
        "logprob": -0.5,
        "bytes": [97],
        "top_logprobs": [
            {"token": "d", "logprob": -0.2, "bytes": [100]},
            {"token": "a", "logprob": -0.5, "bytes": [97]},
        ],
    }
    later = logprobs.completion_logprobs(entries[:1], tokens, logprobs.TextOffset(7), True)
    merged = logprobs.merge_logprobs(False, [comp, later])
    assert merged["tokens"] == ["a", "b", "a"] and merged["text_offset"] == [4, 5, 7]
    assert logprobs.merge_logprobs(True, []) is None
    # vLLM's return_tokens_as_token_ids: every token named "token_id:N"; offsets and bytes the token's
    ids = TokenIdText(tokens)
    named = logprobs.completion_logprobs(entries, ids, logprobs.TextOffset(4), True)
    assert named["tokens"] == [f"token_id:{a}", f"token_id:{b}"] and named["text_offset"] == [4, 5]
    assert named["top_logprobs"][0] == {f"token_id:{d}": -0.2, f"token_id:{a}": -0.5}
    assert logprobs.chat_logprobs(entries, ids)["content"][1] == {
        "token": f"token_id:{b}",
        "logprob": -1.0,
        "bytes": [98],
        "top_logprobs": [],
    }


def test_error_chunks_as_http_errors() -> None:
    from dlora.common.messages import ErrorCode
    from dlora.services.gateway.responses import refusal

    gone = refusal(ErrorCode.NOT_FOUND, "adapter 'x' is not registered")
    assert (gone.status, gone.body()["error"]["code"]) == (404, "model_not_found")
    assert (refusal(None, "boom").status, refusal(ErrorCode.UNAVAILABLE, "").status) == (500, 503)


@pytest.mark.parametrize(
    "name, base, hinted",
    [
        # (a folder's name: test_gateway_shaping) a served name that is a Hub id, as vLLM's default is
        ("/hf/meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", True),
        ("meta-llama/Llama-3.1-8B/", "meta-llama/Llama-3.1-8B", True),
        ("Llama-3.1-8B/", "meta-llama/Llama-3.1-8B", False),
        ("not-meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", False),  # whole parts only
    ],
)
def test_a_404_names_the_base_to_a_path_ending_in_its_name(name: str, base: str, hinted: bool) -> None:
    """A served name with a slash (``served_model_name = "meta-llama/Llama-3.1-8B"``) was never
    hinted: only the path's last part was compared with it."""
    message = openai.model_not_found(name, base).message
    assert message.startswith(f"The model '{name}' does not exist")
    assert (f"The base model is served as '{base}'" in message) is hinted


def test_an_echoed_prompts_offsets_end_where_its_text_does() -> None:
    """A SentencePiece vocabulary spells a word's leading space into its token ("▁re"): counted
    from 0, every offset after the first word was one too far from the echoed "kalo remi"."""
    from dlora.common.messages import TokenLogprob

    class Pieces:  # the bytes a SentencePiece vocabulary holds: BOS, "▁kalo", "▁re", "mi"
        spelled = {1: b"<s>", 2: b" kalo", 3: b" re", 4: b"mi"}
        special_ids = frozenset({1})

        def text_of(self, t: int, before: list[int]) -> str:
            return ["", "<s>", "\u2581kalo", "\u2581re", "mi"][t]

        def bytes_of(self, t: int) -> bytes:
            return self.spelled[t]

        def offsets_in(self, text: str, ids: list[int]) -> None:  # no offset mapping: found in the echo
            return None

    entries = [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in (2, 3, 4)]
    lp = logprobs.prompt_logprobs([1, 2, 3, 4], entries, Pieces(), "kalo remi")  # type: ignore[arg-type]
    assert lp["text_offset"] == [0, 0, 4, 7] and "kalo remi"[4:].startswith(" re")
    assert lp["token_logprobs"] == [None, -1.0, -1.0, -1.0] and lp["top_logprobs"][0] is None


def test_a_forced_tool_call_answers_as_openai_s() -> None:
    """A named tool_choice: the message holds no content and one call whose arguments are the
    text; streamed, the call opens with its id and name, its arguments follow, the last event's
    delta is empty (OpenAI's forced call, finish_reason "stop")."""
    call = Shape(True, "chatcmpl-abc", "m", 0, tool="lookup")
    [choice] = call.full([Choice(0, '{"q": 1}', "stop")], 3, 4)["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": tool_call_id("chatcmpl-tool-abc0"),
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"q": 1}'},
            }
        ],
        "refusal": None,
    }
    first = call.chunk("", None, first=True)["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["tool_calls"][0]["function"] == {"name": "lookup", "arguments": ""}
    assert first["tool_calls"][0]["id"] == choice["message"]["tool_calls"][0]["id"]
    assert call.chunk('{"q"', None)["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"q"'}}]
    }
    assert call.chunk("", "stop")["choices"][0]["delta"] == {}
    assert call.chunk("}", "stop")["choices"][0]["delta"]["tool_calls"][0]["function"] == {"arguments": "}"}
