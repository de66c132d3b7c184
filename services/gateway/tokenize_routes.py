"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: a prompt (or a conversation, rendered as
chat requests render it) as the served model's token ids, and token ids as text. For clients that
count tokens before they send, or budget ``max_tokens`` against the context."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from dlora.services.gateway import openai
from dlora.services.gateway.chat_template import ChatTemplate, chat_prompt_ids
from dlora.services.gateway.openai import APIError, ChatMessage, Tool, documented, model_not_found

if TYPE_CHECKING:
    from dlora.services.gateway.main import Gateway


class TokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Exactly one of ``prompt`` (special tokens added as a completion's prompt gets them, unless
    ``add_special_tokens`` is false) and ``messages`` (rendered as a chat request's, with its
    options; the template places special tokens itself)."""

    model: str | None = None  # None: the base model (vLLM makes it optional here; lm-eval sends none)
    prompt: str | None = None
    add_special_tokens: bool | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None  # rendered by the template, as a chat request's
    documents: list[dict[str, str]] | None = None  # likewise
    return_token_strs: bool | None = False  # null: false (vLLM declares it optional)


class DetokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None  # None: the base model
    tokens: list[Annotated[int, documented(minimum=0)]]


class TokenizeRoutes:
    """The two handlers, for callers who may use the model they name (inference scope), within
    their key's limits, on the gateway's shaping thread (one tokenizer caller; a megabyte prompt
    takes a second of it, not the event loop's)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def tokenize(self, request: web.Request) -> web.Response:
        """200 ``{"count", "max_model_len", "tokens", "token_strs"}`` (vLLM's answer; the tokens'
        strings as the vocabulary holds them, when asked). Raises (answered): APIError 400
        (neither or both of prompt and messages, a refused conversation), 401/403, 404 (a model
        the caller may not use), 429."""
        return await self._answer(request, TokenizeBody, self._tokenize)

    async def detokenize(self, request: web.Request) -> web.Response:
        """200 ``{"prompt"}``. Raises (answered): APIError 400 (an id outside the vocabulary),
        401/403, 404, 429."""
        return await self._answer(request, DetokenizeBody, self._detokenize)

    def _tokenize(self, body: TokenizeBody) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        tokenizer: Any = self.gw.served.tokenizer
        if body.messages is not None:
            template = ChatTemplate.of(body, self.gw.served.call_id_length)
            ids = chat_prompt_ids(body.messages, tokenizer, template, self.gw.served.content_format)
        else:
            ids = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False))
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.gw.served.context, "tokens": ids, "token_strs": strs}

    def _detokenize(self, body: DetokenizeBody) -> dict[str, Any]:
        if any(not 0 <= t < self.gw.served.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {self.gw.served.vocab_size})", param="tokens")
        return {"prompt": self.gw.served.tokenizer.decode(body.tokens)}

    async def _answer(
        self, request: web.Request, kind: type[_Body], work: Callable[[_Body], dict[str, Any]]
    ) -> web.Response:
        who = await self.gw.auth.inference(request)
        with self.gw.auth.admitted(who):
            body = openai.decode_body(await self.gw.read_body(request), kind)
            if body.model not in (None, "", self.gw.base_name) and await self.gw.entry(body.model, who) is None:
                raise model_not_found(body.model, self.gw.base_name)
            encoded = await asyncio.get_running_loop().run_in_executor(
                self.gw.shaping, lambda: msgspec.json.encode(work(body))
            )
        return web.Response(body=encoded, content_type="application/json")


_Body = TypeVar("_Body", TokenizeBody, DetokenizeBody)
