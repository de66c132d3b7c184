"""What a request that does not decode may still say, so that its sender is told why instead of
waiting for chunks that never come (a dispatcher's 400, a worker's 503 in a rolling upgrade)."""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import msgspec

from dlora.common import subjects
from dlora.common.messages import MAX_NAME, ErrorCode, FinishReason, TokenChunk, error_text

# msgspec names where validation failed as a path ("... - at `$.params.max_tokens`") or, at the
# top level, the field itself ("Object missing required field `model`").
_PATH = re.compile(r"at `\$\.([\w.]+)")
_FIELD = re.compile(r"(?:unknown|required) field `(\w+)`")


def field_of(reason: str, within: str | None = None) -> str | None:
    """The field a msgspec validation error's ``reason`` is about (an error's ``param``): the
    path's first name, or its second where the first is ``within`` (a GenerateRequest's
    ``params``: the SamplingParams field, as a worker's refusal names it); a field missing or
    unknown where the path ends. None where it names none."""
    path = m.group(1).split(".") if (m := _PATH.search(reason)) else []
    if (named := _FIELD.search(reason)) is not None and (not path or path == [within]):
        return named.group(1)
    if len(path) > 1 and path[0] == within:
        return path[1]
    return path[0] if path else None


def holds_lone_surrogate(decoded: object) -> bool:
    """Whether JSON decoded by the standard library (``json.loads``) holds a lone UTF-16 surrogate
    in a string: valid JSON (Python's json.dumps writes one as ``\\ud800``), but not text, so no
    tokenizer takes it and msgspec refuses the message whole."""
    try:
        json.dumps(decoded, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class RequestHead(NamedTuple):
    """What a ``GenerateRequest`` that does not decode may still say, to answer its sender."""

    request_id: str
    reply_to: str
    lone_surrogate: bool  # a string holds a lone UTF-16 surrogate (``holds_lone_surrogate``)
    next_seq: int  # the seq its answer carries (0 where it says none)
    recoveries: int  # its attempt (0 where it says none)
    client: str = ""  # its reader's name, where it gives one that can be (its answer is replayed to it)


def request_head(data: bytes, cut: bool = False) -> RequestHead | None:
    """The head of a request msgspec refuses, read by the standard library's JSON (which takes a
    lone surrogate, valid JSON as Python's json.dumps writes one, that msgspec calls truncated
    input); an id written as a number is read as text, and a reply subject not given as text is
    "" (a request sent with NATS request/reply needs none). None where it names no id that can
    be written back; an id longer than ``MAX_NAME`` is none, unless ``cut``: then its first
    ``MAX_NAME`` characters (to answer its sender, not to name a request)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested past the parser
        return None
    if not isinstance(obj, dict):
        return None
    rid, reply = obj.get("request_id"), obj.get("reply_to")
    rid = str(rid) if isinstance(rid, int) and not isinstance(rid, bool) else rid
    if cut and isinstance(rid, str):  # enough for its sender to know it, and an answer small enough to send
        rid = rid[:MAX_NAME]
    reply = reply if isinstance(reply, str) else ""
    if not isinstance(rid, str) or not (rid + reply).isprintable() or len(rid) > MAX_NAME:
        # a lone surrogate is not printable: such an id or subject cannot be written back (nor an
        # id too long to be one: ``MAX_NAME``)
        return None
    client = obj.get("client")
    client = client if isinstance(client, str) and client.isprintable() and len(client) <= MAX_NAME else ""
    counts = _count(obj.get("next_seq")) or 0, _count(obj.get("recoveries")) or 0
    return RequestHead(rid, reply, holds_lone_surrogate(obj), *counts, client)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def refusal(subject: str, reply: str, data: bytes, error: msgspec.DecodeError) -> tuple[list[str], TokenChunk] | None:
    """What a dispatcher answers a request on ``subject`` that does not decode (``data``, with
    NATS reply subject ``reply``), and where: its reply subject where that is one of its sender's
    own, and the NATS reply subject of a request/reply (``nc.request``), which a decodable request
    is answered on too; the sender would wait for chunks, or an answer, that never come. An id
    too long is written back cut (``request_head``). None: neither (counted as rejected alone)."""
    owner = subjects.sender(subject)
    # Cut, not dropped: a request whose only fault was its id's length was answered on its NATS
    # reply subject alone, and its reader of reply_to waited for ever (a helper's finding).
    head = request_head(data, cut=True)
    targets = []
    if head is not None and (not owner or subjects.replies_to(owner, head.reply_to)):
        targets.append(head.reply_to)
    if reply and (not owner or subjects.replies_to(owner, reply)):
        targets.append(reply)
    targets = [t for t in dict.fromkeys(targets) if subjects.publishable(t)]
    if not targets:
        return None
    why = "a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"
    chunk = TokenChunk(
        request_id=head.request_id if head is not None else "",
        seq=0,
        error=error_text(f"the request does not decode: {why if head and head.lone_surrogate else error}"),
        error_code=ErrorCode.BAD_REQUEST,
        param=param if (param := field_of(str(error), "params")) and len(param) <= 64 else None,
        finish_reason=FinishReason.ERROR,
    )
    return targets, chunk
