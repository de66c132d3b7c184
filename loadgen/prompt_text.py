"""A workload's prompt ids as the text ``--backend openai-chat`` sends, of the workload's length.

The ids are random; their text, decoded, does not encode back to as many tokens: a byte-level
tokenizer writes a byte that is no whole character as U+FFFD, three bytes again, and merges
differ across the random boundaries. On the tiny demo model 256 ids came back as ~370 tokens, and
`make run`'s 512-token context refused every chat request of the default workload (vLLM's random
dataset had the same fault: vllm-project/vllm#17408, #24937, which iterate decode and encode).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from typing import Any

TRIES = 10
# Tokens cut back, at most, to reach a whole character's end: a character is at most 4 bytes, and
# a merge across the cut a token or two more. Unbounded, a tokenizer whose text never encodes back
# to its tokens (a prefix space its decode keeps) re-encoded the whole prompt once a token: n² work.
DROPS = 8
# A SentencePiece tokenizer's byte-fallback tokens (Llama 2: 3-258; Mistral v0.3: 771-1026): a raw
# byte each, invalid UTF-8 past 0x7F (chat text of U+FFFD), left out of the prompts drawn
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def ordinary_ids(tokenizer: Any) -> list[int]:
    """Every id of ``tokenizer``'s vocabulary (its ``vocab_size``, added tokens apart) that is no
    special token, ascending, which ``workload.prompt_ids`` draws its prompts from: vLLM's random
    dataset draws from ``vocab_size`` less ``all_special_ids``; the added tokens marked special are
    left out too, as a tokenizer need not list them among its special tokens' map; and its
    byte-fallback tokens (256 of Llama 2's 32,000 ids).

    Raises:
        ValueError: every id is special (no prompt can be drawn)."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    ids = [i for i in range(int(tokenizer.vocab_size)) if i not in special]
    out = [i for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if not _BYTE_TOKEN.fullmatch(str(token))]
    if not out:
        raise ValueError("the tokenizer's vocabulary holds no token that is not special: no prompt can be drawn")
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _whole(tokenizer: Any, seq: list[int]) -> tuple[list[int], str | None]:
    """``seq`` cut back to where its text encodes to it again, with that text; None where
    ``DROPS`` tokens did not reach one."""
    for _ in range(DROPS):
        if not seq:
            break
        text = str(tokenizer.decode(seq))
        if _encode(tokenizer, text) == seq:
            return seq, text
        seq = seq[:-1]
    return seq, None


def text_of_length(tokenizer: Any, ids: list[int], tries: int = TRIES) -> str:
    """Text that ``tokenizer`` encodes (no special tokens added, as the server's chat template
    tokenizes a message's text) to ``len(ids)`` tokens where it can be found within ``tries``
    rounds, else to fewer (more only where no shorter text was found: one byte that is no
    character): decoded, encoded again, cut back to a whole character where it is longer, and
    filled from its own tokens where it is shorter (vLLM's ``gen_prompt_decode_to_target_len``
    fills with random ones and may end longer). A round that comes back to an earlier one ends
    them: the rest would only repeat it (a quarter of the demo's prompts, a token short, went
    round all ten, each a whole encode and decode more)."""
    target = len(ids)
    seq = list(ids)
    best, best_len = "", 0
    seen: set[tuple[int, ...]] = set()
    for _ in range(tries):
        if (key := tuple(seq)) in seen:
            break
        seen.add(key)
        text: str | None = str(tokenizer.decode(seq))
        seq = _encode(tokenizer, str(text))
        if len(seq) > target:
            seq, text = _whole(tokenizer, seq[:target])
        if text is not None and len(seq) == target:
            return text
        if text is not None and len(seq) > best_len:
            best, best_len = text, len(seq)
        seq = seq + list(itertools.islice(itertools.cycle(seq), target - len(seq))) if seq else list(ids)
    return best or str(tokenizer.decode(ids))


def chat_texts(
    tokenizer: Any, prompts: Iterable[list[int]], on_made: Callable[[int], None] | None = None
) -> Callable[[int, list[int]], str]:
    """``text_of_length`` of each of ``prompts`` (request 0, 1, ...), made now, before the run
    (vLLM builds its dataset before the first request): at send time it cost ~5 ms a 256-token
    prompt and ~45 ms an 8k one on the event loop that times the sends. ``on_made(k)`` is called as
    the k-th is made (a large run's texts take minutes: the caller shows how far it is).

    Returns ``text(index, ids)``: request ``index``'s text, made from ``ids`` where ``index`` is
    past ``prompts`` (a warm-up's). Each text is kept as its UTF-8 bytes, by its index, as the
    request's body sends it: keyed by its ids' tuple (8 bytes a token) they held 2.6 GB more at
    10,000 prompts of 32k tokens, and a ``str`` takes 2 or 4 bytes a character once one of its
    characters is past Latin-1 (a random draw over a real vocabulary's pieces has such)."""
    made: list[bytes] = []
    for ids in prompts:
        made.append(text_of_length(tokenizer, ids).encode())
        if on_made is not None:
            on_made(len(made))

    def text(index: int, ids: list[int]) -> str:
        return made[index].decode() if 0 <= index < len(made) else text_of_length(tokenizer, ids)

    return text
