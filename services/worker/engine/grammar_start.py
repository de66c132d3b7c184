"""Where a structured output's grammar starts binding a request's output: just past the first
occurrence of its ``structured_after_token_ids`` (a reasoning model's ``</think>``: vLLM's
``reasoning_ended``, after which its structured-output manager advances the grammar), or from the
first token where it names none. Read from the output's token ids alone, so a request resumed or
moved here with its output so far lands where the one that made them was. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dlora.common.sampling import SamplingParams

if TYPE_CHECKING:
    from dlora.services.worker.engine.structured import Grammars


def grammar_start(output_ids: Sequence[int], after: Sequence[int]) -> int | None:
    """The index in ``output_ids`` of the first token the grammar binds: 0 where ``after`` is
    empty, else just past ``after``'s first occurrence; None: it has not occurred (not yet)."""
    n = len(after)
    if n == 0:
        return 0
    first = after[0]
    for i in range(len(output_ids) - n + 1):
        if output_ids[i] == first and list(output_ids[i : i + n]) == list(after):
            return i + n
    return None


def completes(output_ids: Sequence[int], after: Sequence[int]) -> bool:
    """Whether ``output_ids``' last tokens are ``after`` (non-empty): the token just added started
    the grammar, where it had not started before (a step's check, not a scan of the whole output)."""
    n = len(after)
    return 0 < n <= len(output_ids) and list(output_ids[-n:]) == list(after)


def started_matcher(grammars: Grammars, params: SamplingParams, resumed: list[int]) -> tuple[Any, int | None]:
    """The matcher of ``params``' structured output for a request whose output so far is
    ``resumed`` (a moved or recovered one's), and where its grammar starts there: the matcher has
    taken the tokens past that point, none if it has not come. Raises as ``Grammars.matcher``."""
    start = grammar_start(resumed, params.structured_after_token_ids)
    return grammars.matcher(params, resumed[start:] if start is not None else []), start
