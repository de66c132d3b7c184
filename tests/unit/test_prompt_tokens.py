"""A request's prompts as token ids (``prompt_tokens``, through ``shaping``): their length against
the context and max_tokens, their forms and token ids, and their truncation, refused as vLLM
words it; with the tiny model's real tokenizer and no servers."""

from __future__ import annotations

from dlora.services.gateway import shaping
from dlora.services.gateway.served_model import ServedModel
from tests.unit.test_gateway_shaping import CONTEXT, refused, served, shape  # noqa: F401 - served: a fixture


def test_a_prompt_too_long_for_the_context_is_refused(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    long = [5] * (CONTEXT - 4)
    assert shape(served, {"prompt": long, "max_tokens": 4}).choices[0].request.params.max_tokens == 4
    e = refused(served, {"prompt": long, "max_tokens": 5})
    assert (e.status, e.param) == (400, "max_tokens")
    assert e.message == (
        f"This model's maximum context length is {CONTEXT} tokens. However, you requested {CONTEXT + 1} tokens "
        f"({CONTEXT - 4} in the prompt, 5 in the completion). Please reduce the length of the prompt or completion."
    )

    # A prompt that fills the context is the prompt's fault whatever max_tokens says: set, left to
    # its default, or 0 (an echo alone may fill the context, not exceed it).
    def too_long(n: int, field: str = "prompt") -> tuple[str, str]:
        return field, (
            f"This model's maximum context length is {CONTEXT} tokens. However, you requested {n} tokens in "
            f"the {field}. Please reduce the length of the {field}."
        )

    full = [5] * CONTEXT
    for body in ({"prompt": full, "max_tokens": 1}, {"prompt": full}, {"prompt": full + [5], "max_tokens": 0}):
        e = refused(served, body)
        assert (e.status, (e.param, e.message)) == (400, too_long(len(body["prompt"])))
    assert shape(served, {"prompt": full, "max_tokens": 0, "echo": True}).choices[0].request is None
    assert refused(served, {"prompt": [], "max_tokens": 1}).message == "the prompt is empty"
    assert refused(served, {"prompt": [], "max_tokens": 0}).param == "prompt"
    # a chat request without max_tokens may fill the context; its messages may not
    msgs = [{"role": "user", "content": "kalo"}]
    chat = shape(served, {"messages": msgs}, chat=True)
    assert chat.choices[0].request.params.max_tokens == CONTEXT - chat.prompt_tokens
    # null as absent, in either field (vLLM's chat: the context's rest)
    for nulls in (
        {"max_tokens": None},
        {"max_completion_tokens": None},
        {"max_tokens": None, "max_completion_tokens": None},
    ):
        assert shape(served, {"messages": msgs} | nulls, chat=True).choices[0].request.params.max_tokens == (
            CONTEXT - chat.prompt_tokens
        )
    assert (
        shape(served, {"messages": msgs, "max_tokens": 3, "max_completion_tokens": None}, chat=True)
        .choices[0]
        .request.params.max_tokens
        == 3
    )
    # a completion's null max_tokens is its default, 16, as absent: vLLM since #45491 (before it, null
    # was the context's rest and then an AssertionError, a 500: vLLM #19862); OpenAI's default too
    for body in ({"prompt": "kalo"}, {"prompt": "kalo", "max_tokens": None}):
        assert shape(served, body).choices[0].request.params.max_tokens == shaping.DEFAULT_COMPLETION_TOKENS == 16
    assert refused(served, {"prompt": [5] * (CONTEXT - 15), "max_tokens": None}).param == "max_tokens"
    # the field the client sent is the one named (a user's trial: max_tokens, never sent)
    for field in ("max_completion_tokens", "max_tokens"):
        assert refused(served, {"messages": msgs, field: CONTEXT}, chat=True).param == field
    e = refused(served, {"messages": [{"role": "user", "content": "kalo " * CONTEXT}]}, chat=True)
    assert e.param == "messages" and e.message.endswith(
        "tokens in the messages. Please reduce the length of the messages."
    )


def test_malformed_prompts_and_too_many_choices(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    e = refused(served, {"prompt": [1, "x"]})
    assert (e.status, e.param, e.message) == (
        400,
        "prompt",
        "prompt must be a string, a list of token ids, or a list of either",
    )
    for bad in ([1.5], [[1, 2], [True]]):  # a fraction or a bool is no token id (an integral float is: vLLM's)
        assert refused(served, {"prompt": bad}).param == "prompt"
    assert [c.request.prompt_token_ids for c in shape(served, {"prompt": [[5.0, 6], [7e0]]}).choices] == [[5, 6], [7]]
    e = refused(served, {"prompt": [served.vocab_size]})
    assert e.message == f"prompt token ids must be in [0, {served.vocab_size})"
    e = refused(served, {"prompt": ["a", "b", "c"], "n": 100})
    assert (e.status, e.param) == (400, "n") and "300 choices; at most 256" in e.message


def test_a_truncated_text_prompt_keeps_the_bos_its_tokenizer_adds_as_vllm_does(tiny_llama) -> None:
    """vLLM's tokenizer truncates a text prompt from the left and then adds its special tokens:
    BOS and the last N - 1 tokens (the ids were sliced, BOS lost). Token ids are sliced as given."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama.model)
    bos = tok.convert_ids_to_tokens(tok.bos_token_id)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    text = "the quick brown fox jumps over the lazy dog"
    tok.truncation_side = "left"  # as vLLM's get_tokenizer makes it
    expected = tok.encode(text, truncation=True, max_length=4)
    assert expected[0] == tok.bos_token_id
    job = shape(ServedModel(tok, len(tok), CONTEXT), {"prompt": text, "max_tokens": 1, "truncate_prompt_tokens": 4})
    assert job.choices[0].request.prompt_token_ids == expected
    ids = tok.encode(text)
    job = shape(ServedModel(tok, len(tok), CONTEXT), {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": 4})
    assert job.choices[0].request.prompt_token_ids == ids[-4:]
    # vLLM's add_special_tokens: false tokenizes a text prompt without them (no BOS)
    job = shape(ServedModel(tok, len(tok), CONTEXT), {"prompt": text, "max_tokens": 1, "add_special_tokens": False})
    assert job.choices[0].request.prompt_token_ids == tok.encode(text, add_special_tokens=False) == ids[1:]
