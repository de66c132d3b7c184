"""Tool calls' ids: vLLM's form, or the short one a model family's templates take. Chat, its
stream and the Responses API name calls through ``tool_call_id`` alone."""

from __future__ import annotations

import hashlib
import string

# The call ids a parser's model family takes: Mistral's templates refuse any but 9 alphanumeric
# characters (vLLM makes its ids so, and cuts a history's to their last 9, in its mistral
# tokenizer mode).
CALL_ID_LENGTHS = {"mistral": 9}
_ALPHANUMERIC = string.ascii_letters + string.digits
# vLLM's tool call ids: this and 32 hex digits (its ``random_tool_call_id``, a uuid4's hex).
CALL_ID_PREFIX = "chatcmpl-tool-"


def tool_call_id(seed: str, length: int = 0) -> str:
    """The id of the tool call ``seed`` names (a response's random id, the choice and the call's
    place in it): vLLM's form, ``chatcmpl-tool-`` and 32 hex digits (46 characters), or ``length``
    alphanumeric ones where the parser's model family takes only those (``CALL_ID_LENGTHS``).
    Drawn from the seed rather than at random, so a stream, its whole answer and the Responses
    API's items made of either give a call the same id."""
    if length:
        return short_call_id(seed, length)
    return CALL_ID_PREFIX + hashlib.blake2b(seed.encode(), digest_size=16).hexdigest()


def short_call_id(seed: str, length: int) -> str:
    """``length`` alphanumeric characters drawn from ``seed``: the same seed, the same id (a
    stream and the whole answer agree)."""
    n, chars = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=16).digest(), "big"), []
    for _ in range(length):
        n, r = divmod(n, len(_ALPHANUMERIC))
        chars.append(_ALPHANUMERIC[r])
    return "".join(chars)
