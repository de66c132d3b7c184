"""A request's prompts as token ids: a completions ``prompt`` read into ids (``prompt_ids``), cut to
its last tokens (``truncated``), and the tokens left to generate beside it in the context
(``max_new_tokens``), refused with the ``APIError`` vLLM gives. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from dlora.common import integers
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.served_model import Tokenizer


def truncated(ids: list[int], text: str | None, tokenizer: Tokenizer, keep: int) -> list[int]:
    """A prompt's last ``keep`` tokens (vLLM's truncate_prompt_tokens); one given as ``text`` keeps
    the special tokens its tokenizer puts around it (a Llama tokenizer's BOS), as vLLM's
    tokenizer truncating from the left does (the text's ids kept are ``keep`` less those)."""
    if len(ids) <= keep:
        return ids
    body = tokenizer.encode(text, add_special_tokens=False) if text is not None else ids
    head = next((p for p in range(len(ids) - len(body) + 1) if ids[p : p + len(body)] == body), None)
    if head is None or keep - (len(ids) - len(body)) < 1:  # none to keep apart, or no room beside them
        return ids[-keep:]
    tail = len(ids) - head - len(body)
    return ids[:head] + body[len(body) - (keep - head - tail) :] + ids[len(ids) - tail :]


def prompt_ids(
    prompt: str | list[Any], tokenizer: Tokenizer, vocab_size: int, add_special_tokens: bool = True
) -> list[tuple[list[int], str | None]]:
    """Each prompt's token ids, and its text where it came as a string (tokenized with the special
    tokens the tokenizer puts around a text, a Llama tokenizer's BOS, unless
    ``add_special_tokens`` is false). A completions ``prompt`` is a string, a list of token ids,
    or a list of either (several prompts); a token id may be written as an integral float (``5.0``).

    Raises:
        APIError(400): another form, or a token id outside [0, ``vocab_size``).
    """
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    out: list[tuple[list[int], str | None]] = []
    for p in prompt if many else [prompt]:
        if isinstance(p, str):
            out.append((list(tokenizer.encode(p, add_special_tokens=add_special_tokens)), p))
            continue
        try:  # 5.0 is 5, as vLLM's lax list[int] reads it (common/integers.py)
            p = [integers.whole("prompt", t) for t in p]
        except integers.NotWhole:
            raise APIError(
                400, "prompt must be a string, a list of token ids, or a list of either", param="prompt"
            ) from None
        if any(not 0 <= t < vocab_size for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        out.append((p, None))  # (a list of its own already)
    return out


def max_new_tokens(
    ids: list[int], asked: int | None, context: int, field: str = "prompt", asked_in: str = "max_tokens"
) -> int:
    """Tokens to generate after the prompt ``ids`` (the request's ``field``: prompt or messages):
    ``asked`` (the request's ``asked_in`` field: max_tokens or max_completion_tokens), or (None) all the
    context leaves; 0 asks for none (a completion's echo).

    Raises:
        APIError(400): the prompt is empty or longer than the context (``param``: ``field``), or
            leaves less room than ``asked`` (``param``: ``asked_in``).
    """
    if not ids:
        raise APIError(400, "the prompt is empty", param=field)
    room = context - len(ids)
    # With nothing to generate the prompt may fill the context; else it must leave a token's room.
    # The messages are vLLM's, which names the same two cases.
    limit = f"This model's maximum context length is {context} tokens. However, you requested"
    if room < (0 if asked == 0 else 1):
        raise APIError(
            400, f"{limit} {len(ids)} tokens in the {field}. Please reduce the length of the {field}.", param=field
        )
    if asked is not None and asked > room:
        raise APIError(
            400,
            f"{limit} {len(ids) + asked} tokens ({len(ids)} in the {field}, {asked} in the completion). "
            f"Please reduce the length of the {field} or completion.",
            param=asked_in,
        )
    return room if asked is None else asked
