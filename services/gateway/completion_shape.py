"""The completions and chat completions response objects, as OpenAI's API and vLLM's spell them:
a response's shape (``Shape``: completion or chat, its tool calls and reasoning read out of each
choice's text), whole (``full``) or as server-sent event chunks (``chunk``), and their usage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dlora.services.gateway.call_ids import CALL_ID_PREFIX, tool_call_id
from dlora.services.gateway.reasoning import REASONING_END, ReasoningParser, split
from dlora.services.gateway.tool_base import Call, joined
from dlora.services.gateway.tool_calls import CallStream
from dlora.services.gateway.tool_parsers import ToolParser


@dataclass
class Choice:
    """One choice of a response as it completes (one prompt x one of its ``n`` samples)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or token id that ended it
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's field (``vllm_prompt_logprobs``)
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the choice's generated tokens
    prompt_token_ids: list[int] | None = None  # and its prompt's


@dataclass
class Shape:
    """What a response looks like: completion or chat, for one request."""

    chat: bool
    request_id: str
    model: str
    created: int
    tool: str | None = None  # a chat's forced function (tool_choice): each choice answers as a call of it
    # tool_choice "required": each choice's output is a list of calls (tool_calls.calls_schema),
    # answered as OpenAI's tool_calls with finish_reason "tool_calls"; streamed, a call per item.
    tools_required: bool = False
    _call_streams: dict[int, CallStream] = field(default_factory=dict)
    _opened: set[int] = field(default_factory=set)  # choices whose forced call has opened (id and name sent)
    # tool_choice "auto": each choice's text read for calls alike whole and streamed (tool_parsers.PARSERS; "": not)
    tool_parser: str = ""
    tool_names: frozenset[str] | None = None  # the request's tools' (ToolParser.names)
    parallel_calls: bool = True  # parallel_tool_calls; false: at most one call (OpenAI's), the first
    # What the calls' ids are made of: random per response (dlora's own request id), never the
    # client's request_id (a session id reused per turn gave every turn the same call ids).
    call_ids: str = ""
    call_id_length: int = 0  # calls' ids of this many alphanumeric characters (call_ids.CALL_ID_LENGTHS); 0: ours
    _parsers: dict[int, ToolParser] = field(default_factory=dict)
    # A chat reply's role: the assistant's, or with add_generation_prompt false the last message's
    # (vLLM's get_chat_request_role: an echoed user message came back as the assistant's)
    role: str = "assistant"
    # The gateway's reasoning_parser ("": off): a chat's <think> block goes out as "reasoning", the rest as
    # content, the only text tool_parser reads (reasoning.py); thinking false (qwen3's enable_thinking): all content.
    reasoning_parser: str = ""
    thinking: bool = True
    include_reasoning: bool = True  # false (with a reasoning_parser): no reasoning, nor logprobs or ids that show it
    _reasoners: dict[int, ReasoningParser] = field(default_factory=dict)

    @classmethod
    def new(cls, chat: bool, request_id: str, model: str) -> Shape:
        return cls(chat, request_id, model, int(time.time()))

    def _head(self, streaming: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def full(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            shown = c.logprobs if self.include_reasoning else None
            choice: dict[str, Any] = {"index": c.index, "logprobs": shown, "finish_reason": c.finish_reason}
            choice["stop_reason"] = c.stop_reason
            reasoning, text = split(self.reasoning_parser, c.text, self.thinking)
            if self.tools_required:  # (the calls are the content: a grammar binds only what follows the reasoning)
                (calls := CallStream()).feed(text or "")
                listed = [self._call(c.index, args, name, k) for k, (name, args) in enumerate(calls.calls)]
                choice["message"] = {"role": self.role, "content": None} | ({"tool_calls": listed} if listed else {})
                if c.finish_reason == "stop" and calls.closed:
                    choice["finish_reason"] = "tool_calls"
            elif self.tool is not None:  # OpenAI's forced call: no content, the call's arguments the text
                calls = [self._call(c.index, text or "")] if reasoning is None or REASONING_END in c.text else []
                choice["message"] = {"role": self.role, "content": None} | ({"tool_calls": calls} if calls else {})
            elif self.tool_parser:
                parser = ToolParser(self.tool_parser, names=self.tool_names)
                content, calls = self._allowed(joined(parser.feed(text or ""), parser.finish()))
                said = (content or None) if parser.tools_called else content  # (beside calls "" is null: vLLM's)
                choice["message"] = {"role": self.role, "content": said}
                if calls:
                    choice["message"]["tool_calls"] = [self._call(c.index, args, name, k) for k, name, args in calls]
                    if c.finish_reason == "stop":
                        choice["finish_reason"] = "tool_calls"
            elif self.chat:
                choice["message"] = {"role": self.role, "content": text}
            else:
                choice["text"] = c.text
            if self.chat:  # refusal: the spec requires it, null (OpenAI and vLLM send it); reasoning: vLLM's, null too
                shown = {"reasoning": reasoning if self.include_reasoning else None} if self.reasoning_parser else {}
                content = (choice["message"]["content"] or None) if shown else choice["message"]["content"]
                content = "" if self._no_call(choice["message"]) else content
                choice["message"] |= {"content": content, "refusal": None} | shown
            if c.prompt_logprobs is not None and not self.chat:
                choice["prompt_logprobs"] = c.prompt_logprobs
            if c.token_ids is not None and self.include_reasoning:  # (false: they would show the reasoning)
                choice["token_ids"] = c.token_ids
                if not self.chat:
                    choice["prompt_token_ids"] = c.prompt_token_ids
            out.append(choice)
        response = {**self._head(False), "choices": out}
        response["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        if self.chat and (asked := [c.prompt_logprobs for c in choices if c.prompt_logprobs is not None]):
            response["prompt_logprobs"] = asked[0]  # one prompt, whatever n: the response's (vLLM's)
        if self.chat and (ids := [c.prompt_token_ids for c in choices if c.token_ids is not None]):
            response["prompt_token_ids"] = ids[0]  # likewise
        return response

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        *,  # by name: an index given in first's place was taken for it
        first: bool = False,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
        token_ids: list[int] | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> dict[str, Any]:
        """One event of a streamed response; ``token_ids`` / ``prompt_token_ids``: vLLM's
        return_token_ids (the event's tokens; the prompt's, with a choice's first event)."""
        shown = logprobs if self.include_reasoning else None
        choice: dict[str, Any] = {"index": index, "logprobs": shown, "finish_reason": finish_reason}
        choice["stop_reason"] = stop_reason
        if token_ids is not None and self.include_reasoning:
            choice["token_ids"] = token_ids
        reasoner = self._reasoners.get(index) or self._reasoners.setdefault(
            index, ReasoningParser(self.reasoning_parser, self.thinking)
        )
        reasoning, text = reasoner.piece(text, finish_reason is not None)  # (no parser: "", the text as it is)
        reasoning = reasoning if self.include_reasoning else ""  # (its event says content "", as a held token's)
        if self.tools_required:  # each call whole, id, name and arguments, as its item of the list ends
            calls = self._call_streams.setdefault(index, CallStream())
            listed = [self._call(index, args, name, k) | {"index": k} for k, name, args in calls.feed(text)]
            choice["delta"] = ({"role": self.role, "content": None} if first else {}) | (
                {"tool_calls": listed} if listed else {}
            )
            if finish_reason == "stop" and calls.closed:
                choice["finish_reason"] = "tool_calls"
            if finish_reason is not None and not calls.calls:  # (as a whole answer's: ``_no_call``)
                choice["delta"]["content"] = ""
        elif self.tool is not None:  # opens with its id and name past the reasoning (vLLM's), then the arguments
            opens = (reasoner.ended if self.reasoning_parser else first) and index not in self._opened
            self._opened |= {index} if opens else set()
            call = self._call(index, text) | {"index": 0} if opens else {"index": 0, "function": {"arguments": text}}
            said = {"tool_calls": [call]} if opens or text else {}  # (content comes only once it has opened)
            choice["delta"] = ({"role": self.role, "content": None} if first else {}) | said
            if finish_reason is not None and index not in self._opened:  # (as a whole answer's: ``_no_call``)
                choice["delta"]["content"] = ""
        elif self.tool_parser:  # text as it comes, held back only where a call may begin; each call whole
            parser = self._parsers.setdefault(index, ToolParser(self.tool_parser, names=self.tool_names))
            content, calls = parser.feed(text)
            if finish_reason is not None:
                content, calls = joined((content, calls), parser.finish())
            content, calls = self._allowed((content, calls))
            listed = [self._call(index, args, name, k) | {"index": k} for k, name, args in calls]
            delta: dict[str, Any] = {"role": self.role} if first else {}
            if content or first or (finish_reason is None and not listed and not reasoning):
                delta["content"] = content
            choice["delta"] = delta | ({"tool_calls": listed} if listed else {})
            if finish_reason == "stop" and parser.calls:
                choice["finish_reason"] = "tool_calls"
        elif self.chat:
            # Content always, "" too, but in the last event when it adds nothing (OpenAI's "delta":
            # {}): a token whose text is held back (a character split across tokens) still has an
            # event, and code that appends delta.content mid-stream must not meet None (vLLM sends "").
            content = {"content": text} if text or first or (finish_reason is None and not reasoning) else {}
            choice["delta"] = ({"role": self.role} if first else {}) | content
        else:
            choice["text"] = text
            if prompt_token_ids is not None:
                choice["prompt_token_ids"] = prompt_token_ids
        if reasoning:
            choice["delta"]["reasoning"] = reasoning
        head = self._head(True)
        if self.chat and prompt_token_ids is not None:
            head["prompt_token_ids"] = prompt_token_ids
        return {**head, "choices": [choice]}

    def _no_call(self, message: dict[str, Any]) -> bool:
        """Whether a forced call's or a required list's choice made no call (cut short, or all
        reasoning): its content is "" then, not null, as vLLM's (``content or ""``). An assistant
        message with null content and no tool_calls is one OpenAI's API refuses (content is
        required unless tool_calls is given), so a client that sends the turn back was refused."""
        return (self.tools_required or self.tool is not None) and "tool_calls" not in message

    def _allowed(self, read: tuple[str, list[Call]]) -> tuple[str, list[Call]]:
        content, calls = read
        return content, calls if self.parallel_calls else [c for c in calls if c[0] == 0]

    def silent(self, event: dict[str, Any]) -> bool:
        """Whether a mid-stream event of a tool-call answer, or of one whose reasoning is hidden
        (include_reasoning false: a thinking token), says nothing (its text held back, a call not
        whole yet): not sent, as vLLM sends none. A text answer keeps an event per token."""
        if not (self.tool or self.tools_required or self.tool_parser) and self.include_reasoning:
            return False
        [choice] = event["choices"]
        if choice["finish_reason"] is not None or choice["logprobs"] is not None or "role" in choice["delta"]:
            return False
        if choice.get("token_ids"):  # return_token_ids: the ids must all reach the client (a review)
            return False
        delta = choice["delta"]
        said = delta.get("content") or delta.get("reasoning")
        return not said and not any("id" in c or c["function"]["arguments"] for c in delta.get("tool_calls", []))

    def _call(self, index: int, arguments: str, name: str | None = None, k: int = 0) -> dict[str, Any]:
        """Choice ``index``'s ``k``-th call of ``name`` (default: the forced one); a delta adds its ``index``."""
        base = self.call_ids or self.request_id.rsplit("-", 1)[-1]
        # seeded by what the ids were before (chatcmpl-tool-<hex><index>): a Mistral id stays as it was
        call_id = tool_call_id(f"{CALL_ID_PREFIX}{base}{index}" + (f"-{k}" if k else ""), self.call_id_length)
        function = {"name": self.tool if name is None else name, "arguments": arguments}
        return {"id": call_id, "type": "function", "function": function}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; with ``cached_tokens`` (a response's final usage) its
    ``prompt_tokens_details``: how many prompt tokens came from the prefix cache, as OpenAI always
    says (vLLM with --enable-prompt-tokens-details). Not in the per-event usage of vLLM's
    continuous_usage_stats, whose shape is vLLM's."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
