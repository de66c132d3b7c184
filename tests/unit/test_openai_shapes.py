import json
import shutil
from pathlib import Path

import msgspec
import pytest

from dlora.services.gateway import openai
from dlora.services.gateway.openai import APIError, ChatMessage, CompletionBody, Shape


def test_decode_errors_are_400_with_the_reason() -> None:
    with pytest.raises(APIError, match="malformed JSON") as e:
        openai.decode_body(b"{", CompletionBody)
    assert e.value.status == 400
    with pytest.raises(APIError, match="max_tokens"):
        openai.decode_body(b'{"model": "m", "prompt": "x", "max_tokens": "3"}', CompletionBody)


def test_sampling_params_map_and_refuse_unsupported() -> None:
    body = msgspec.convert({"model": "m", "prompt": "x", "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 4},
                           CompletionBody)
    p = openai.sampling_params(body, 7)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (7, 0.5, 0.9, ["\n"], 4)
    for field, value in (("best_of", 2), ("suffix", "x"), ("logit_bias", {"5": 1.0})):
        body = msgspec.convert({"model": "m", "prompt": "x", field: value}, CompletionBody)
        with pytest.raises(APIError, match=field):
            openai.sampling_params(body, 7)


class _Chars:
    """A tokenizer without a chat template: one id per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_chat_prompt_without_a_template_is_a_transcript() -> None:
    msgs = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content=[openai.ContentPart(type="text", text="hi")])]
    assert openai.chat_prompt_ids(msgs, tokenizer=_Chars()) == [ord(c) for c in "system: be brief\nuser: hi\nassistant:"]
    with pytest.raises(APIError, match="role"):
        openai.chat_prompt_ids([ChatMessage(role="robot", content="x")], tokenizer=_Chars())


def llama_style_tokenizer(model_dir: Path, out: Path):
    """The tiny model's tokenizer made Llama-like: it adds BOS itself, and its chat template writes
    {{ bos_token }} too (Llama-2/3 and Mistral checkpoints do both)."""
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tj = json.loads((out / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tj["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    (out / "tokenizer.json").write_text(json.dumps(tj))
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}[assistant] {% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    return AutoTokenizer.from_pretrained(out)


def test_a_template_that_writes_bos_gets_one_bos(tiny_llama, tmp_path: Path) -> None:
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    assert tok.encode("kalo")[0] == tok.bos_token_id  # the tokenizer adds one by itself
    msgs = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="kalo remi")]
    ids = openai.chat_prompt_ids(msgs, tok)
    expected = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "kalo remi"}],
                                       tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == list(expected) and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_response_shapes() -> None:
    chat, text = Shape.new(True, "chatcmpl-1", "m"), Shape.new(False, "cmpl-1", "m")
    full = chat.full([openai.Choice(0, "hello", "stop")], 3, 2)
    assert full["object"] == "chat.completion" and full["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert full["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert text.full([openai.Choice(0, "hi", "length")], 1, 1)["choices"][0]["text"] == "hi"
    two = text.full([openai.Choice(1, "b", "stop"), openai.Choice(0, "a", "stop")], 1, 2)["choices"]
    assert [(c["index"], c["text"]) for c in two] == [(0, "a"), (1, "b")]
    first = chat.chunk("", None, first=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.chunk("", "stop")["choices"][0]["delta"] == {}
    assert text.usage_chunk(1, 2)["choices"] == []
    assert APIError(404, "no").body() == {"error": {"message": "no", "type": "not_found_error", "param": None, "code": None}}


def test_logprob_objects() -> None:
    from dlora.common.messages import TokenLogprob

    decode = {1: "a", 2: "bc", 3: "d"}.__getitem__
    entries = [TokenLogprob(1, -0.5, [(3, -0.2), (1, -0.5)]), TokenLogprob(2, -1.0, [])]
    comp = openai.completion_logprobs(entries, decode, offset=4)
    assert comp == {"tokens": ["a", "bc"], "token_logprobs": [-0.5, -1.0],
                    "top_logprobs": [{"d": -0.2, "a": -0.5}, {"bc": -1.0}], "text_offset": [4, 5]}
    chat = openai.chat_logprobs(entries, decode)
    assert chat["content"][0] == {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "d", "logprob": -0.2, "bytes": [100]}, {"token": "a", "logprob": -0.5, "bytes": [97]}]}
    merged = openai.merge_logprobs(False, [comp, openai.completion_logprobs(entries[:1], decode, 7)])
    assert merged["tokens"] == ["a", "bc", "a"] and merged["text_offset"] == [4, 5, 7]
    assert openai.merge_logprobs(True, []) is None
