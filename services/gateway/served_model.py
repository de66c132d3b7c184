"""The base model the gateway serves, as request shaping reads it: its tokenizer, vocabulary,
context and the parsers its output is read with (``ServedModel``), and what of its files will
fail some requests (``model_problems``). Pure: no aiohttp, no NATS, no Redis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from dlora.model.config import ModelConfig
from dlora.services.gateway.call_ids import CALL_ID_LENGTHS
from dlora.services.gateway.chat_template import template_problem
from dlora.services.gateway.reasoning import MARKED, REASONING_END, REASONING_START, tag_problem
from dlora.services.worker.engine.detokenizer import spaces_added_tokens
from dlora.services.worker.engine.structured import Grammars

# Structured outputs the gateway compiles at once (``grammar_pool``): a burst of slow schemas takes
# these threads, not every core, and plain requests wait for none of them.
GATEWAY_COMPILES = 4


class Tokenizer(Protocol):
    """What shaping asks of a tokenizer (a Hugging Face one in the gateway). A chat template, if
    it has one, is used through ``apply_chat_template``."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True)
class ServedModel:
    """What shaping needs to know of the base model the gateway serves."""

    tokenizer: Tokenizer
    vocab_size: int  # token ids in a prompt lie in [0, vocab_size)
    context: int  # tokens of prompt plus generated ones at most (max_model_len)
    # Structured output's matchers for this tokenizer: a schema that fails only at its first mask
    # is refused before it is sent (None: the workers find it)
    grammars: Grammars | None = None
    # The model's sampling defaults for what a request leaves out (``model.config.sampling_defaults``):
    # temperature, top_p, top_k, min_p, repetition_penalty; max_tokens caps every request (vLLM's).
    defaults: Mapping[str, float] = field(default_factory=dict)
    # How the model writes tool calls in its text (the gateway's tool_call_parser; "": not read).
    tool_call_parser: str = ""
    # How the model writes its reasoning (the gateway's reasoning_parser; "": not read).
    reasoning_parser: str = ""
    # How a chat message's content reaches the template (the gateway's chat_template_content_format).
    content_format: str = "auto"
    # Its digest (``model.config.model_digest``): each request says which model its ids are for.
    model_digest: str = ""

    @cached_property
    def reasoning_end(self) -> list[int]:
        """``</think>``'s ids as the tokenizer encodes it: what a structured output beside the
        reasoning parser waits for in the output (``reasoning_end_ids``), encoded once."""
        return list(self.tokenizer.encode(REASONING_END, add_special_tokens=False))

    @cached_property
    def reasoning_start(self) -> list[int]:
        """``<think>``'s ids likewise: where a usage's reasoning tokens start (``ReasoningTokens``)."""
        return list(self.tokenizer.encode(REASONING_START, add_special_tokens=False))

    @property
    def reasoning_tags(self) -> bool:
        """Whether its reasoning parser reads tags (``<think>``), whose tokens a usage counts between."""
        return bool(self.reasoning_parser) and self.reasoning_parser not in MARKED

    @cached_property
    def spaces_added_tokens(self) -> bool:
        """Whether the workers' decode writes spaces between added tokens (``detokenizer``'s)."""
        return spaces_added_tokens(self.tokenizer)

    @property
    def call_id_length(self) -> int:
        """The call ids its tool-call format takes (``call_ids.CALL_ID_LENGTHS``; 0: ours)."""
        return CALL_ID_LENGTHS.get(self.tool_call_parser, 0)

    @classmethod
    def of(
        cls,
        tokenizer: Tokenizer,
        cfg: ModelConfig,
        context: int,
        defaults: Mapping[str, float],
        compile_timeout_s: float | None = None,
        compile_memory_mb: int | None = None,
    ) -> ServedModel:
        """The model of ``cfg`` read through ``tokenizer``, with its structured-output matchers
        (``compile_timeout_s``, ``compile_memory_mb``: ``Grammars``')."""
        grammars = Grammars(
            tokenizer, cfg.vocab_size, set(cfg.eos_token_ids), GATEWAY_COMPILES, compile_timeout_s, compile_memory_mb
        )
        return cls(tokenizer, cfg.vocab_size, context, grammars, defaults)


def model_problems(model: ServedModel) -> list[tuple[str, str]]:
    """(what, why) for each way the served model's files will fail some requests, logged at the
    gateway's start: a chat template that does not compile (chat refused), a ``</think>`` of several
    tokens beside a reasoning parser (``reasoning.tag_problem``)."""
    problems = []
    if (problem := template_problem(getattr(model.tokenizer, "chat_template", None))) is not None:
        problems.append(("the model's chat template does not compile: chat requests will be refused", problem))
    if (problem := tag_problem(model.reasoning_parser, model.reasoning_end)) is not None:
        problems.append(("a structured output beside the reasoning parser may go unbound", problem))
    return problems


def served_context(model_context: int, worker_contexts: list[int]) -> int:
    """The context a request may fill: the model's, or less where even the largest live worker
    holds fewer tokens in one request (its KV cache; 0: a worker that does not say)."""
    known = [n for n in worker_contexts if n > 0]
    return min(model_context, max(known)) if known else model_context
