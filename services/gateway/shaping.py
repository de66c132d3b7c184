"""Request shaping: a decoded OpenAI body in, the ``GenerateRequest`` of each choice out, or the
``APIError`` that refuses it. Pure: no aiohttp, no NATS, no Redis; the caller looks up the adapter
and passes the tokenizer in, so everything here is tested without servers.

One request becomes prompts x ``n`` choices (choice index prompt x n + sample). Checks run in this
order, and the first that fails is the error the client gets: unknown model (404), the prompt (its
form, token ids, chat messages), the number of choices, then per prompt its length against the
context and the sampling parameters; the gateway compiles a structured output's grammar (seconds
for some schemas) only after all of them (``compile_grammar``, ``grammar_pool``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dlora.common import subjects
from dlora.common.messages import AdapterEntry, GenerateRequest
from dlora.services.gateway.chat_template import ChatTemplate, chat_prompt_ids, echoed, reply_role
from dlora.services.gateway.completion_shape import Shape
from dlora.services.gateway.openai import (
    APIError,
    Body,
    ChatBody,
    model_not_found,
)
from dlora.services.gateway.prompt_tokens import max_new_tokens, prompt_ids, truncated
from dlora.services.gateway.reasoning import (
    MARKED,
    closes_reasoning,
    thinking,
)
from dlora.services.gateway.sampling import (
    auto_tools,
    forced_tool,
    prompt_logprobs_wanted,
    sampling_params,
    structured_field,
    tools_required,
)
from dlora.services.gateway.served_model import ServedModel

MAX_CHOICES = 256  # prompts x n in one request
# A completion request without max_tokens, or with null, gets this many (OpenAI's default, and
# vLLM's for null too since its #45491); a chat request without one may fill the context.
DEFAULT_COMPLETION_TOKENS = 16


@dataclass(frozen=True)
class ChoicePlan:
    """One choice to produce: one prompt x one of its ``n`` samples."""

    index: int  # prompt x n + sample
    echo: str  # the choice's text starts with this: the prompt (completions with echo), else ""
    # What the workers generate; None: nothing (max_tokens 0), the choice is over at once ("length").
    request: GenerateRequest | None
    # The request is there for its prompt's logprobs alone (echo with logprobs and max_tokens 0):
    # the one token it generates is not the client's.
    prompt_only: bool = False
    # Its own prompt's token ids: what its usage says in every event (vLLM's continuous_usage_stats),
    # and its prompt_token_ids (return_token_ids).
    prompt_ids: list[int] = field(default_factory=list)
    prompt: int = 0  # which of the request's prompts (its n choices share it)


@dataclass(frozen=True)
class Job:
    """One HTTP request, shaped: what its response looks like and its choices in index order."""

    shape: Shape
    adapter: str | None  # None: the base model
    prompt_tokens: int  # every prompt's tokens once (not once per sample), for usage
    stream: bool  # server-sent events; else one JSON body
    include_usage: bool  # a streamed response ends with a usage chunk
    choices: list[ChoicePlan]
    continuous_usage: bool = False  # every event carries its choice's usage so far (vLLM's)
    token_ids_in_logprobs: bool = False  # logprobs name tokens "token_id:N" (vLLM's return_tokens_as_token_ids)
    return_token_ids: bool = False  # each choice says its token ids and its prompt's (vLLM's)
    # The prompt's logprobs asked for, with how many alternatives: in the echo (a completion's
    # echo with logprobs), and as vLLM's prompt_logprobs field (not streamed). None: not.
    echo_logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_field: str | None = None  # the body's field asking for a structured output (errors' param)
    # A chat's <think> and </think> ids beside a reasoning parser: its usage says how many output
    # tokens were reasoning (vLLM's completion_tokens_details, ``ReasoningTokens``). None: not said.
    reasoning_tags: tuple[list[int], list[int]] | None = None
    # Another API's server-sent events made of each chat event (its ``dialects``); None: the chat's own
    events: Callable[[dict[str, Any]], list[bytes]] | None = None
    # Awaited before the answer's last bytes go out (the Responses API stores its response there):
    # a stream's last event made again where what it told changed (None: it stands)
    finishing: Callable[[], Awaitable[bytes | None]] | None = None


def response_id(chat: bool, base: str) -> str:
    """A response id as OpenAI spells them: ``chatcmpl-<base>``, ``cmpl-<base>``."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{base}"


def shape_request(
    body: Body,
    adapter: AdapterEntry | None,
    model: ServedModel,
    *,
    base_name: str,
    request_id: str,
    gateway_id: str,
    now: float,
    tenant: str | None = None,
    compile_grammar: bool = True,
) -> Job:
    """The request ``body`` as one GenerateRequest per choice. A seeded request's samples take seeds
    seed, seed + 1, ...; each choice's request id is ``request_id``-index and its replies go to
    this gateway's inbox.

    Args:
        adapter: the registry's entry for ``body.model``; None where it has none. Ignored when
            ``body.model`` is ``base_name``, None or "" (the base model: no adapter).
        now: Unix seconds, the response's ``created`` and the requests' entry time.
        tenant: the caller's API key's tenant, which the requests carry; None (no key): the
            body's ``user``.
        compile_grammar: false: the structured output is checked as far as it can be without
            its grammar, which the caller compiles once the request passed every other check
            (``grammar_pool.shaped``: a refused request spends no compile).

    Raises:
        APIError(404): ``body.model`` is neither the base model nor a registered adapter.
        APIError(400): a malformed prompt or conversation, too many choices, a prompt empty or too
            long for the context with ``max_tokens``, a bad sampling parameter (see
            ``sampling_params``); the message names what and the param field where.
    """
    model_name = body.model or base_name  # none named, or "": the base model (vLLM's way)
    if model_name == base_name:
        adapter = None
    elif adapter is None:
        raise model_not_found(model_name, base_name)
    chat = isinstance(body, ChatBody)
    auto = auto_tools(body, model.tool_call_parser)
    prompts: list[tuple[list[int], str | None]]  # ids, and the text where the client wrote one
    asked: int | None  # max_tokens; None: what the context leaves
    if isinstance(body, ChatBody):
        template = ChatTemplate.of(body, model.call_id_length)
        prompts = [(chat_prompt_ids(body.messages, model.tokenizer, template, model.content_format), None)]
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        asked_in = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    else:
        prompts = prompt_ids(body.prompt, model.tokenizer, model.vocab_size, body.add_special_tokens is not False)
        asked = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        asked_in = "max_tokens"
    if (keep := body.truncate_prompt_tokens) is not None:  # vLLM's: the prompt's last tokens (echoed as such)
        if keep == -1:  # vLLM's: as many as the context holds
            keep = model.context
        if not 1 <= keep <= model.context:  # vLLM refuses more than the context, too
            why = f"truncate_prompt_tokens must be -1 or in [1, {model.context}] (the context), got {keep}"
            raise APIError(400, why, param="truncate_prompt_tokens")
        prompts = [
            (truncated(ids, text, model.tokenizer, keep), None if len(ids) > keep else text) for ids, text in prompts
        ]
    echo = bool(body.echo)
    if isinstance(body, ChatBody) and echo and body.tools and body.tool_choice != "none":
        why = "echo is not served with tools unless tool_choice is none: the echo would be read as the model's calls"
        raise APIError(400, why, param="echo")
    if isinstance(body, ChatBody) and echo and model.reasoning_parser:  # vLLM sends it apart, as content
        why = f"echo is not served with the gateway's reasoning_parser ({model.reasoning_parser}): the echoed "
        raise APIError(400, why + "message would be read as the model's reasoning", param="echo")
    # A chat's echo is the last message's text (vLLM's), the same for each choice
    chat_echo = echoed(body.messages, template.add_generation_prompt) if isinstance(body, ChatBody) and echo else ""
    if body.stream_options is not None and not body.stream:  # as OpenAI and vLLM refuse it
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most {MAX_CHOICES} per request",
            param="n" if n > 1 else "prompt",  # the field that made too many
        )
    thinks = isinstance(body, ChatBody) and chat_thinking(body, template, prompts[0][0], model)
    after = reasoning_end_ids(body, model, thinks)
    choices: list[ChoicePlan] = []
    # max_tokens 0 generates nothing (with echo: the prompt back), unless the prompt's logprobs are
    # asked for (OpenAI's original loglikelihood request, or vLLM's prompt_logprobs): those come
    # with one token, not shown.
    echo_logprobs, field_logprobs = prompt_logprobs_wanted(body)
    prompt_only = asked == 0 and (echo_logprobs is not None or field_logprobs is not None)
    for p, (ids, text) in enumerate(prompts):
        if prompt_only and len(ids) >= model.context:  # max_new_tokens would say "you requested the prompt"
            raise APIError(
                400,
                f"This model's maximum context length is {model.context} tokens; the logprobs of a prompt of "
                f"{len(ids)} tokens need one position after it. Please reduce the length of the prompt.",
                param="prompt",
            )
        generate = asked != 0 or prompt_only
        new = max_new_tokens(
            ids, 1 if prompt_only else asked, model.context, "messages" if chat else "prompt", asked_in
        )
        if not prompt_only and (cap := model.defaults.get("max_tokens")):  # vLLM's: the least of them
            new = min(new, int(cap))
        params = sampling_params(
            body, new if generate else 1, model.grammars, model.defaults, compile_grammar, model.spaces_added_tokens
        )
        if after:
            params = msgspec.structs.replace(params, structured_after_token_ids=after)
        if auto and model.tool_call_parser in ("hermes", "mistral") and body.skip_special_tokens is None:
            # Some models' <tool_call> tags and Mistral's [TOOL_CALLS] are special tokens: skipped,
            # the parser would never see a call (vLLM's parsers turn the skipping off alike).
            params = msgspec.structs.replace(params, skip_special_tokens=False)
        if asked == 0 and params.min_tokens:  # as the engine refuses min_tokens > max_tokens
            raise APIError(400, f"min_tokens must be in [0, max_tokens=0], got {params.min_tokens}", param="min_tokens")
        if (outside := params.outside_vocab(model.vocab_size)) is not None:
            raise APIError(400, outside[1], param=outside[0])
        # echoed as the client wrote it; token ids as text, special tokens shown as the output's are
        skip = params.skip_special_tokens
        prefix = chat_echo if chat or not echo else text if text is not None else model.tokenizer.decode(ids, skip)
        for i in range(n):
            index = p * n + i
            request: GenerateRequest | None = None
            if generate:
                sub = f"{request_id}-{index}"
                seeded = (
                    params if params.seed is None else msgspec.structs.replace(params, seed=_nth_seed(params.seed, i))
                )
                request = GenerateRequest(
                    request_id=sub,
                    reply_to=subjects.reply_inbox(sub, gateway_id),
                    adapter=adapter.name if adapter else None,
                    adapter_version=adapter.version if adapter else None,
                    prompt_token_ids=ids,
                    params=seeded,
                    tenant=(body.user or "") if tenant is None else tenant,
                    priority=body.priority or 0,
                    cache_salt=body.cache_salt or "",
                    prompt_cache_key=(body.prompt_cache_key or "") if isinstance(body, ChatBody) else "",
                    group=f"{request_id}/{p}" if n > 1 else "",
                    created=now,
                    client=gateway_id,  # it announces itself: if it dies, its requests are dropped
                    model_digest=model.model_digest,
                )
            choices.append(ChoicePlan(index, prefix, request, prompt_only, prompt_ids=ids, prompt=p))
    role = reply_role(body.messages, template.add_generation_prompt) if isinstance(body, ChatBody) else "assistant"
    shown = request_id if body.request_id is None else f"{'chatcmpl' if chat else 'cmpl'}-{body.request_id}"
    return Job(
        Shape(
            chat,
            shown,
            model_name,
            int(now),
            tool=tool.name if (tool := forced_tool(body)) else None,
            tools_required=tools_required(body),
            tool_parser=model.tool_call_parser if auto else "",
            tool_names=frozenset(t.function.name for t in body.tools or []) if isinstance(body, ChatBody) else None,
            parallel_calls=not (isinstance(body, ChatBody) and body.parallel_tool_calls is False),
            call_ids=request_id.rsplit("-", 1)[-1].removeprefix("resp_"),  # (a Responses id's: as a chat's)
            call_id_length=model.call_id_length,
            role=role,
            reasoning_parser=model.reasoning_parser if chat else "",
            include_reasoning=not (
                isinstance(body, ChatBody) and model.reasoning_parser and body.include_reasoning is False
            ),
            thinking=thinks if isinstance(body, ChatBody) else True,
        ),
        adapter.name if adapter else None,
        prompt_tokens=sum(len(ids) for ids, _ in prompts),
        stream=bool(body.stream),
        include_usage=body.stream_options is not None and bool(body.stream_options.include_usage),
        # vLLM's: only with include_usage (without it, no usage anywhere)
        continuous_usage=body.stream_options is not None
        and bool(body.stream_options.include_usage and body.stream_options.continuous_usage_stats),
        choices=choices,
        token_ids_in_logprobs=bool(body.return_tokens_as_token_ids),
        return_token_ids=bool(body.return_token_ids),
        echo_logprobs=echo_logprobs,
        prompt_logprobs=field_logprobs,
        structured_field=structured_field(body),
        reasoning_tags=(model.reasoning_start, model.reasoning_end) if chat and model.reasoning_tags else None,
    )


def chat_thinking(body: ChatBody, template: ChatTemplate, ids: list[int], model: ServedModel) -> bool:
    """Whether a chat's output is read for reasoning (``reasoning.thinking``): not where its
    prompt closed the think block already (``closes_reasoning``; a generation prompt's is in its
    last tokens, a continued message's anywhere in it). Nor a structured output whose reasoning
    is not asked for (``include_reasoning: false``): vLLM binds its grammar from the first token
    then (``resolve_reasoning_ended``), so the output is the answer, read as content (held back
    until a ``</think>``, it thought unseen and was billed for it, where vLLM's user pays none)."""
    if not thinking(model.reasoning_parser, dict(template.kwargs)):
        return False
    if not model.reasoning_parser:  # (nothing read: the text as it is)
        return True
    if body.include_reasoning is False and structured_field(body) is not None:
        return False
    if model.reasoning_parser in MARKED and structured_field(body) is not None:
        return False  # (granite's markers are text no grammar waits for: it binds from the first token)
    continued = template.continue_final_message
    text = model.tokenizer.decode(ids if continued else ids[-PROMPT_TAIL:], skip_special_tokens=False)
    return not closes_reasoning(text, continued)


# The prompt's last tokens read for a generation prompt that closes the think block: "</think>" and
# the whitespace after it, however a tokenizer without it as one token spells it.
PROMPT_TAIL = 32


def reasoning_end_ids(body: Body, model: ServedModel, thinks: bool) -> list[int]:
    """The token ids after which a chat's structured output binds its output: with a reasoning
    parser, and ``thinks`` (``chat_thinking``), the end of the reasoning (``</think>`` as the
    tokenizer encodes it: one special token for R1's and Qwen3's), as vLLM holds the grammar back
    until the reasoning ends; else none, the grammar binds from the first token (a qwen3 chat told
    ``enable_thinking: false``, or a continued message, has its think block closed in the prompt).
    A worker older than the field refuses such a request."""
    if not isinstance(body, ChatBody) or not model.reasoning_parser or structured_field(body) is None:
        return []
    if not thinks:
        return []
    return list(model.reasoning_end)  # (a copy: each request's own)


def _nth_seed(seed: int, i: int) -> int:
    """Sample ``i``'s seed: ``seed + i``, wrapped within the signed 64 bits a seed may take."""
    return (seed + i + (1 << 63)) % (1 << 64) - (1 << 63)
