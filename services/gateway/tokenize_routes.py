"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: a prompt (or a conversation, rendered as
chat requests render it) as the served model's token ids, and token ids as text. For clients that
count tokens before they send, or budget ``max_tokens`` against the context."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from dlora.services.gateway import openai
from dlora.services.gateway.openai import APIError, ChatMessage
from dlora.services.gateway.shaping import ChatTemplate, chat_prompt_ids

if TYPE_CHECKING:
    from dlora.services.gateway.main import Gateway


class TokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Exactly one of ``prompt`` (completions: special tokens added as a completion's prompt gets
    them, unless ``add_special_tokens`` is false) and ``messages`` (chat, with its rendering options)."""

    model: str
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    tokens: list[int]


class TokenizeRoutes:
    """The two handlers, for callers who may use the model they name (inference scope)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def tokenize(self, request: web.Request) -> web.Response:
        """200 ``{"count", "max_model_len", "tokens"[, "token_strs"]}``, vLLM's answer. Raises
        (answered): APIError 400 (neither or both of prompt and messages, a refused
        conversation), 401/403, 404 (a model the caller may not use)."""
        body = await self._body(request, TokenizeBody)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        tokenizer = self.gw.served.tokenizer
        if body.messages is not None:
            template = ChatTemplate.of(body)  # type: ignore[arg-type]  # the fields it reads are here
            ids = await asyncio.to_thread(chat_prompt_ids, body.messages, tokenizer, template)
        else:
            encode: Any = tokenizer.encode
            ids = list(await asyncio.to_thread(encode, body.prompt, add_special_tokens=body.add_special_tokens))
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.gw.served.context, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [self.gw.token_text.text_of(t) for t in ids]
        return web.json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        """200 ``{"prompt"}``. Raises (answered): APIError 400 (an id outside the vocabulary),
        401/403, 404."""
        body = await self._body(request, DetokenizeBody)
        if any(not 0 <= t < self.gw.served.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {self.gw.served.vocab_size})", param="tokens")
        text = await asyncio.to_thread(self.gw.served.tokenizer.decode, body.tokens)
        return web.json_response({"prompt": text})

    async def _body(self, request: web.Request, kind: type[_Body]) -> _Body:
        who = await self.gw.auth.inference(request)
        body = openai.decode_body(await self.gw.read_body(request), kind)
        if body.model != self.gw.base_name and await self.gw.entry(body.model, who) is None:
            raise APIError(404, f"model {body.model!r} does not exist", param="model", code="model_not_found")
        return body


_Body = TypeVar("_Body", TokenizeBody, DetokenizeBody)
