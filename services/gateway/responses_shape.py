"""The Responses API's answer made of the chat's (``responses_api``): the chat completion the
chat path shapes (content, tool calls and reasoning already read by its parsers) as OpenAI's
``response`` object, and each chat event of a stream as the Responses events the openai package's
``responses.stream`` reads (``response.created`` ... ``response.completed``). Pure: no aiohttp.

The ``output_text`` of the openai package's Response is its own property (the message items'
texts joined), not a field of the object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dlora.services.gateway.completion_shape import Shape
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.responses_api import ResponsesBody, chat_format, renamed

Keep = Callable[[dict[str, Any]], bool]
# Why a background response is failed (its record is all its client reads): over the store's bound
TOO_LARGE = "the response is over responses_max_bytes, so it cannot be stored"
# A background response's failed object too large to keep with its conversation: the request's
# echoes, each unbounded in size, emptied (each still of the type OpenAI's Response gives it)
SHRUNK: dict[str, Any] = {"instructions": None, "metadata": {}, "text": {"format": {"type": "text"}}, "tools": []}
SHRUNK |= {"user": None, "prompt_cache_key": None, "safety_identifier": None}


def _part(kind: str, text: str = "", logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A content part; an output_text's ``logprobs`` are the chat's entries (token, logprob, bytes,
    top_logprobs), OpenAI's Logprob: empty unless asked for (``responses_api.OUTPUT_LOGPROBS``)."""
    extra = {"annotations": [], "logprobs": logprobs or []} if kind == "output_text" else {}
    return {"type": kind, "text": text} | extra


def _entries(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat choice's (or its event's) logprobs entries, every output token's: its reasoning's
    and calls' too, as vLLM's Responses gives them."""
    return list((choice.get("logprobs") or {}).get("content") or [])


def _usage(prompt: int, completion: int, cached: int, reasoning: int = 0) -> dict[str, Any]:
    # reasoning_tokens: counted by the writer beside a reasoning parser (``ReasoningTokens``), as vLLM's
    return {
        "input_tokens": prompt,
        # cache_write_tokens: the openai package's type requires it; what the prefix cache keeps is not counted
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


@dataclass
class ResponsesShape(Shape):
    """A chat's shape (one choice: the Responses API has no ``n``) answering as the Responses API."""

    asked: ResponsesBody | None = None  # the body as sent, echoed in the response object
    # Whether its final object (completed, incomplete, failed) is stored, told it (and storing it
    # then: ``responses_store.Keeping``); None: not stored (``store`` false, the store off)
    keep: Keep | None = None
    _seq: int = 0  # the next event's sequence_number
    _items: list[dict[str, Any]] = field(default_factory=list)  # the output so far (streamed)
    _open: dict[str, Any] | None = None  # the item the stream is writing
    # Its text (or a call's arguments) so far, joined when it closes: added to the item at each
    # delta, every event copied all the text before it (128k tokens: 63 us an event, 8 s in all)
    _pieces: list[str] = field(default_factory=list)
    _finish: str | None = None
    _last: dict[str, Any] | None = None  # the stream's last event (its response final), as framed
    # The output's logprobs entries streamed so far (the message's part at its close), and those
    # not sent yet: a token of no text yet (a character's first bytes), a reasoning's or a call's,
    # goes with the next output_text delta, else with output_text.done
    _logprobs: list[dict[str, Any]] = field(default_factory=list)
    _unsent: int = 0
    # The last message's closed output_text part: the stream's end gives it every entry, those of
    # a function call after it too, as ``full``'s message has them (its done events went before)
    _said: dict[str, Any] | None = None

    @classmethod
    def of(cls, shape: Shape, asked: ResponsesBody, keep: Keep | None = None) -> ResponsesShape:
        return cls(**vars(shape), asked=asked, keep=keep)

    @property
    def base(self) -> str:
        """What the response's and its items' ids are made of: the chat's id less its prefix (a
        client's own request_id as sent, less a "resp_" of its own: vLLM's ids are "resp_...")."""
        return self.request_id.split("-", 1)[-1].removeprefix("resp_")

    def response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """OpenAI's response object; ``status`` "incomplete": it ran out of max_output_tokens."""
        a = self.asked or ResponsesBody(input="")
        fmt = a.text.format if a.text is not None and chat_format(a.text.format) is not None else None
        text = {"format": fmt or {"type": "text"}}
        return {
            "id": f"resp_{self.base}",
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": a.background is True,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": a.instructions,
            "max_output_tokens": a.max_output_tokens,
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": a.parallel_tool_calls is not False,
            "previous_response_id": a.previous_response_id,
            # echoed as OpenAI's Response carries them (openai-python's types.responses.Response);
            # prompt_cache_key also routes the request (dispatcher ``affinity``), safety_identifier only echoed
            "prompt_cache_key": a.prompt_cache_key,
            "safety_identifier": a.safety_identifier,
            "prompt_cache_retention": a.prompt_cache_retention,  # (taken, as vLLM's, with no cache tiers)
            # the effort asked, as OpenAI's and vLLM's echo it (it went to the template: responses_api)
            "reasoning": {"effort": a.reasoning.effort if a.reasoning else None, "summary": None},
            "service_tier": a.service_tier or "default",
            "store": self.keep is not None,  # (false in a final object too large to keep: ``final``)
            "temperature": a.temperature,
            "text": text | ({"verbosity": a.text.verbosity} if a.text and a.text.verbosity else {}),
            "tool_choice": a.tool_choice or "auto",  # (OpenAI's default, tools or none)
            "tools": [{"strict": None, "description": None} | t for t in a.tools or []],
            "top_p": a.top_p,
            "top_logprobs": a.top_logprobs,  # (served with include OUTPUT_LOGPROBS: echoed as OpenAI's is)
            "truncation": "disabled",
            "usage": usage,
            "user": a.user,
            "metadata": a.metadata or {},
        }

    def final(self, response: dict[str, Any]) -> dict[str, Any]:
        """``response``, the last this request makes, kept if it is to be (told so in its ``store``).
        A background one not kept (over ``responses_max_bytes``) is made ``failed``, as its record
        is: its stream ended ``response.completed`` where a retrieve read ``failed``. One whose
        failed object is over the bound still is shrunk (``SHRUNK``'s echoes emptied; its id,
        status and error kept) and kept: not kept, its stream's end, which goes with its record,
        was dropped, and the run's fallback ended it saying Redis had failed."""
        if self.keep is not None:
            response["store"] = self.keep(response)
            if not response["store"] and response["background"]:
                failed = self.response("failed", []) | {"error": {"code": "server_error", "message": TOO_LARGE}}
                if not (stored := self.keep(failed)):
                    stored = self.keep(failed := failed | SHRUNK)
                response.clear()
                response.update(failed, store=stored)
        return response

    def _item(self, kind: str, k: int, **extra: Any) -> dict[str, Any]:
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        item: dict[str, Any] = {"id": f"{prefix}_{self.base}_{k}", "type": kind}
        if kind == "message":
            item |= {"status": "completed", "role": "assistant", "content": []}
        elif kind == "reasoning":
            item |= {"summary": [], "content": []}
        return item | extra

    def full(
        self, choices: list[Any], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        """The chat completion's one choice as the response object."""
        [choice] = super().full(choices, prompt_tokens, completion_tokens, cached_tokens)["choices"]
        message, output = choice["message"], []
        calls = message.get("tool_calls") or []
        if message.get("reasoning"):
            output.append(self._item("reasoning", 0, content=[_part("reasoning_text", message["reasoning"])]))
        if message.get("content") or not (output or calls):
            text = message.get("content") or ""
            output.append(self._item("message", len(output), content=[_part("output_text", text, _entries(choice))]))
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        for call in calls:
            function = call["function"]
            output.append(
                self._item(
                    "function_call",
                    len(output),
                    call_id=call["id"],
                    name=function["name"],
                    arguments=function["arguments"],
                    status=status,
                )
            )
        for item in output:
            item["status"] = status
        return self.final(self.response(status, output, _usage(prompt_tokens, completion_tokens, cached_tokens)))

    # ---- streamed ------------------------------------------------------------------------
    def events(self, chat: dict[str, Any]) -> list[bytes]:
        """The Responses events one chat event makes (the writer's ``Job.events``): the first
        opens the response; a delta's reasoning, content and calls open, fill and close items; the
        usage chunk (always asked: ``responses_api.to_chat``) ends it; an error body fails it."""
        out: list[dict[str, Any]] = []
        if self._seq == 0 and "error" not in chat:
            out += [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]
        if "error" in chat:  # named by the Responses field, as a refusal before the stream is
            error = chat["error"]
            self._settle()  # (the failed response shows the open item's text so far, its logprobs too)
            if self._open is not None and self._open["type"] == "message":
                self._open["content"][0]["logprobs"] = list(self._logprobs)
            named = renamed(APIError(500, error["message"], error["param"]))
            out.append({"type": "error", "code": error["code"], "message": named.message, "param": named.param})
            failed = self.response("failed", self._items)
            failed["error"] = {"code": "server_error", "message": named.message}
            out.append({"type": "response.failed", "response": self.final(failed)})
        elif chat.get("choices"):
            out += self._delta(chat["choices"][0])
        elif "usage" in chat:
            out += self._close() if self._items else [*self._into("message"), *self._close()]  # as ``full``'s
            if self._said is not None:
                self._said["logprobs"] = list(self._logprobs)
            usage = chat["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
            done = _usage(usage["prompt_tokens"], usage["completion_tokens"], cached, reasoning)
            incomplete = self._finish == "length"
            final = self.final(self.response("incomplete" if incomplete else "completed", self._items, done))
            out.append({"type": f"response.{final['status']}", "response": final})  # (or failed: ``final``)
        if out and out[-1]["type"] in ("response.completed", "response.incomplete", "response.failed"):
            self._last = out[-1]
        return [self._frame(e) for e in out]

    def again(self) -> bytes | None:
        """The stream's last event framed again, its number kept: what its response says (its
        ``store``, the write failing) changed after it was framed; None: no stream ended here."""
        return None if self._last is None else self._framed(self._last)

    def _frame(self, event: dict[str, Any]) -> bytes:
        event["sequence_number"], self._seq = self._seq, self._seq + 1
        return self._framed(event)

    @staticmethod
    def _framed(event: dict[str, Any]) -> bytes:
        kind: str = event["type"]
        return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"

    def _lifecycle(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "response": self.response("in_progress", [])}

    def _delta(self, choice: dict[str, Any]) -> list[dict[str, Any]]:
        delta, out = choice.get("delta") or {}, []
        entries = _entries(choice)
        self._logprobs += entries
        self._unsent += len(entries)
        if reasoning := delta.get("reasoning"):
            out += self._into("reasoning")
            out.append(self._text_delta("response.reasoning_text.delta", reasoning))
        if content := delta.get("content"):
            out += self._into("message")
            sent, self._unsent = self._logprobs[len(self._logprobs) - self._unsent :], 0
            out.append(self._text_delta("response.output_text.delta", content) | {"logprobs": sent})
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if "id" in call:  # a call begins (its id and name come once)
                out += self._into("function_call", call_id=call["id"], name=function.get("name", ""))
            if (arguments := function.get("arguments")) and self._open is not None:
                self._pieces.append(arguments)
                where = {"item_id": self._open["id"], "output_index": len(self._items) - 1}
                out.append({"type": "response.function_call_arguments.delta", **where, "delta": arguments})
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
            out += self._close()
        return out

    def _text_delta(self, kind: str, text: str) -> dict[str, Any]:
        assert self._open is not None
        self._pieces.append(text)
        where = {"item_id": self._open["id"], "output_index": len(self._items) - 1, "content_index": 0}
        return {"type": kind, **where, "delta": text}

    def _into(self, kind: str, **extra: Any) -> list[dict[str, Any]]:
        """The events that make ``kind`` the item being written: the one open closed, a new one
        added (a function call always new: each has its own)."""
        if self._open is not None and self._open["type"] == kind and kind != "function_call":
            return []
        out = self._close()
        item = self._item(kind, len(self._items), **extra) | {"status": "in_progress"}
        if kind == "function_call":
            item["arguments"] = ""
        self._items.append(item)
        self._open = item
        out.append({"type": "response.output_item.added", "output_index": len(self._items) - 1, "item": dict(item)})
        if kind != "function_call":
            part = _part("reasoning_text" if kind == "reasoning" else "output_text")
            item["content"] = [dict(part)]
            where = {"item_id": item["id"], "output_index": len(self._items) - 1, "content_index": 0}
            out.append({"type": "response.content_part.added", **where, "part": part})
        return out

    def _settle(self) -> None:
        """The open item given its text (or arguments) so far."""
        if self._open is None or not self._pieces:
            return
        said = "".join(self._pieces)
        if self._open["type"] == "function_call":
            self._open["arguments"] += said
        else:
            self._open["content"][0]["text"] += said
        self._pieces.clear()

    def _close(self) -> list[dict[str, Any]]:
        self._settle()
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self._items) - 1
        item["status"] = "incomplete" if self._finish == "length" else "completed"
        where = {"item_id": item["id"], "output_index": index}
        out: list[dict[str, Any]] = []
        if item["type"] == "function_call":
            out.append({"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            kind = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            text_done = {"type": kind, **where, "content_index": 0, "text": part["text"]}
            if item["type"] == "message":  # every logprob so far, those of no text yet too (an EOS's)
                part["logprobs"], self._unsent, self._said = list(self._logprobs), 0, part
                text_done["logprobs"] = part["logprobs"]
            out.append(text_done)
            out.append({"type": "response.content_part.done", **where, "content_index": 0, "part": part})
        out.append({"type": "response.output_item.done", "output_index": index, "item": item})
        return out
