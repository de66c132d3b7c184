"""What refuses a request at the door, before it holds anything. Pure."""

from __future__ import annotations

import re

import msgspec

from dlora.common.messages import MAX_CACHE_SALT, SamplingParams
from dlora.services.worker.engine.outputs import RequestError


class OverContext(RequestError):
    """The prompt and max_tokens overrun this engine's context (``check_tokens``, ``whole``): a
    worker of a longer one may hold them (a fleet of mixed settings)."""


def check_tokens(
    ids: list[int],
    resumed: list[int],
    vocab: int,
    max_model_len: int,
    params: SamplingParams,
    text_pending: int = 0,
    field: str = "prompt_token_ids",
    whole: bool = False,
) -> None:
    """RequestError (a 4xx for the caller) unless the prompt ``ids`` and the outputs ``resumed``
    from an earlier run fit: a prompt at all, every id in [0, vocab), a context the model holds,
    ``resumed`` within ``params.max_tokens`` (an output that reached it or the context exactly
    ended there, its end not recorded: ``ended_on_resume`` ends it "length"; a prompt alone that
    fills the context has no room for a token), the text not yet sent (``text_pending``
    tokens) that of resumed tokens (more would send the prompt's text as output), and every
    ``logit_bias``, ``allowed_token_ids`` and ``stop_token_ids`` id in the vocabulary
    (``SamplingParams.outside_vocab``; vLLM refuses the others alike). ``field``: the request's
    field the prompt came in (``prompt`` or ``prompt_token_ids``), the error's ``param``.
    ``whole``: the prompt and every token ``max_tokens`` allows must fit the context too (a
    service's request: cut short at the context it would end "length" with fewer tokens than asked;
    the dispatcher checks that only where it can count the prompt, not for a text one)."""
    if not 0 <= text_pending <= len(resumed):
        raise RequestError(f"resume_text_pending={text_pending} must be in [0, {len(resumed)}] (the resumed tokens)")
    if not ids:
        raise RequestError("the prompt is empty", param=field)
    if min(ids + resumed) < 0 or max(ids + resumed) >= vocab:  # min/max, not a Python loop per token
        raise RequestError(f"token ids must be in [0, {vocab})", param=field)
    if len(ids) + max(len(resumed), 1) > max_model_len:  # (a prompt alone leaves room for a token)
        raise RequestError(
            f"the prompt has {len(ids) + len(resumed)} tokens; this model's context holds {max_model_len}", param=field
        )
    if len(resumed) > params.max_tokens:
        raise RequestError(
            f"{len(resumed)} resumed tokens are more than max_tokens={params.max_tokens}", param="max_tokens"
        )
    if whole and len(ids) + params.max_tokens > max_model_len:
        raise OverContext(
            f"the request needs {len(ids) + params.max_tokens} tokens ({len(ids)} in the {field}, max_tokens="
            f"{params.max_tokens}); this model's context holds {max_model_len}: lower max_tokens or shorten "
            f"the {field}",
            param="max_tokens",
        )
    if (outside := params.outside_vocab(vocab)) is not None:
        raise RequestError(outside[1], param=outside[0])


def up_to_context(params: SamplingParams, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """``params`` with vLLM's ``max_tokens=None`` (the Python API's; the wire's decoder refuses
    null) read as vLLM's engine reads it: the context the prompt leaves. A prompt that leaves none
    keeps 1, and is refused as too long (``check_tokens``)."""
    if params.max_tokens is not None:
        return params
    return msgspec.structs.replace(params, max_tokens=max(max_model_len - prompt_tokens, 1))


def check_request(
    params: SamplingParams, prompt: str | None, prompt_token_ids: list[int] | None, cache_salt: str, typed: bool = False
) -> None:
    """RequestError unless the request's own fields agree: ``params`` of their types (unless
    ``typed``: decoded off the wire, which checked them), consistent (``SamplingParams.problem``),
    exactly one of ``prompt`` and ``prompt_token_ids``, and a ``cache_salt`` of at most
    ``MAX_CACHE_SALT`` characters."""
    # each names its field (``param``): an application over NATS read null where the gateway names it
    if not typed:  # (a round trip of every field: up to ms for the longest allowed_token_ids)
        _check_types(params)
    if (bad := params.invalid()) is not None:
        raise RequestError(bad[1], param=bad[0])
    if len(cache_salt) > MAX_CACHE_SALT:
        raise RequestError(f"cache_salt holds at most {MAX_CACHE_SALT} characters", param="cache_salt")
    if (prompt is None) == (prompt_token_ids is None):
        raise RequestError("give exactly one of prompt and prompt_token_ids", param="prompt")


def _check_types(params: SamplingParams) -> None:
    """RequestError naming the field where ``params`` were built (the Python API) with a value of
    another type: vLLM's ``max_tokens=None`` or ``seed="3"`` failed later as a TypeError from a
    comparison deep in the engine, naming nothing. (What came off the wire was checked as decoded.)"""
    try:
        msgspec.convert(msgspec.to_builtins(params, enc_hook=_scalar), SamplingParams, strict=True)
    except TypeError:  # a value of no JSON type, nor a scalar's, that the engine took before: taken still
        return
    except msgspec.ValidationError as e:
        field = re.search(r"`\$\.(\w+)", str(e))
        raise RequestError(f"SamplingParams: {e}", param=field.group(1) if field else None) from None


def _scalar(value: object) -> object:
    """A numpy (or torch) scalar's Python value, which the engine took it as: skipped whole, one
    numpy ``max_tokens`` left every other field unchecked. TypeError for anything else."""
    if getattr(value, "shape", None) == () and callable(item := getattr(value, "item", None)):
        return item()
    raise TypeError(f"no JSON type: {type(value).__name__}")
