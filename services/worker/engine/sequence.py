"""One request's state inside the engine."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dlora.common.messages import FinishReason, SamplingParams, TokenLogprob
from dlora.services.worker.engine.detokenizer import IncrementalDetokenizer

# The value of a token sampled but not yet on the host (async scheduling): never a vocabulary id.
RESERVED = -1


class Status(enum.Enum):
    # Needs a prefill (new, or preempted); holds blocks once a chunk of it or a cached prefix is in
    WAITING = "waiting"
    RUNNING = "running"  # KV cached up to all tokens but the last: decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # scheduling order: priority, then arrival (``fcfs_arrival``)
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    # Tokens whose K/V are in the cache. RUNNING keeps this at len(all_ids) - 1: the last sampled
    # token is fed at the next step, so prefill and decode are one code path.
    num_cached: int = 0
    # Tokens fed at the step being run (set by the scheduler): num_new, or a chunk of a prefill.
    num_scheduled: int = 0
    text: str = ""  # output text so far (stop string cut off)
    emitted: int = 0  # characters of text already returned to the caller
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Prompt tokens its first prefill found in the prefix cache (vLLM's num_cached_tokens: the
    # usage's prompt_tokens_details.cached_tokens); a preempted request's second look is not counted.
    num_cached_prompt: int = 0
    # That first lookup's (tokens looked up, tokens found) until the step it was made for takes in
    # its KV, then counted in the stats: a prefill whose row async scheduling drops before that
    # (``async_scheduling.recompute``) looks up again, and that lookup is the one counted.
    lookup: tuple[int, int] | None = None
    # Its first admission here with the prefix cache on was kept (counted, or one collecting prompt
    # logprobs that may not reuse): a later one, after a preemption, is not counted (vLLM's queries
    # leave preempted requests out). Apart from ``num_preemptions``: a first prefill preempted before
    # its row was looked at (``forget_lookup``) is a preemption whose next lookup still counts.
    looked_up: bool = False
    # Its prompt's tokens, until its first token is made here (then counted in prompt_tokens_total,
    # as vLLM counts at prefill: not one aborted or moved before it); 0 for a request resumed here.
    uncounted_prompt: int = 0
    # Engine clock seconds of the first step that scheduled it: its time waiting ends there (vLLM's
    # scheduled_ts), however many steps its prefill then takes.
    scheduled_at: float | None = None
    # Unix seconds it entered the system (vLLM's arrival_time; a moved or recovered request's first)
    arrival_time: float = 0.0
    matcher: Any = None  # llguidance matcher of its JSON Schema (structured output), or None
    # Where in output_ids its matcher starts (``grammar_start``: past its structured_after_token_ids);
    # None: not yet, the output unmasked and the matcher given no token until then
    grammar_from: int | None = 0
    bad_words_ids: list[list[int]] = field(default_factory=list)  # its bad_words, tokenized (bad_words.py)
    allowed_mask: Any = None  # (vocab,) bool on the engine's device: its allowed_token_ids (sampler.allowed_mask)
    # Entry i: prompt token i + 1's log-probability after the ones before it (prompt_logprobs.py)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    cache_salt: str = ""  # vLLM's: its prefix-cache blocks are shared only with requests of the same salt
    # Its full blocks' names in the prefix cache, per cache key, as far as looked: for the policy's
    # look at what a waiting prompt would find cached (``queue_view.queued``), hashed once.
    block_names: dict[bytes, list[bytes]] = field(default_factory=dict)

    def salted(self, key: bytes) -> bytes:
        """A prefix-cache key (which weights compute its KV) made this request's: with its salt, if
        it has one, so that only requests that know the salt find its blocks (and time their hits)."""
        return key + b"\x00salt=" + self.cache_salt.encode() if self.cache_salt else key

    def take_lookup(self) -> tuple[int, int]:
        """Its lookup not yet in the stats, (0, 0) if none; it is then counted."""
        lookup, self.lookup = self.lookup or (0, 0), None
        return lookup

    @property
    def priority(self) -> int:
        """vLLM's priority, lower first: its key's (``fcfs_arrival``; a resumed one's may lie one below
        its priority's base)."""
        return (self.arrival + 1) // PRIORITY_SPAN

    @property
    def in_flight(self) -> bool:
        """Its last token is reserved, its value not yet on the host (async scheduling)."""
        return bool(self.output_ids) and self.output_ids[-1] == RESERVED

    @property
    def collects_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and has no output yet (they go with its first token)."""
        return self.params.prompt_logprobs is not None and not self.output_ids

    def scheduled_ids(self) -> list[int]:
        """This step's input: the ``num_scheduled`` tokens after the cached ones (sliced, not built
        whole: a chunk of a long prompt is a small part of it)."""
        start, end, n = self.num_cached, self.num_cached + self.num_scheduled, len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def grammar(self) -> Any:
        """Its matcher where the grammar binds the next token (None: free, or not started yet)."""
        return self.matcher if self.grammar_from is not None else None

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_new(self) -> int:
        """Tokens to feed at the next step: the whole context after a preemption, else one."""
        return self.total_len - self.num_cached


# Keys of one priority lie within this span of its base: more requests than an engine sees in its
# life, so every key of a priority sorts before every key of the next.
PRIORITY_SPAN = 1 << 42


def fcfs_arrival(
    count: int, resumed: bool, seqs: Iterable[Sequence], priority: int = 0, arrival_time: float | None = None
) -> int:
    """The scheduling key of the engine's ``count``-th request, added now beside ``seqs``: lower
    runs first. ``priority`` first (vLLM's priority scheduling: lower is served earlier, 0 is
    normal), then arrival: after every other of its priority (even keys, 2 * count above the
    priority's base); or, for one that resumes outputs produced elsewhere (moved in, or recovered
    from a lost worker, or preempted here: ``requeue``), just ahead of the requests of its
    priority that arrived here and wait (the odd key below the first of them), behind those
    running, resumed ones in the order they come (equal keys keep the order they were added in).
    It was running where it came from: as vLLM puts a preempted request back at the front of its
    waiting queue, not behind newcomers; ahead of the running ones its recompute would take their
    decodes' token budget and, as a step's first request where KV is short, evict them. (In the
    simulator this order did not stop migration hurting at 8 x 64 x 0.5 load, issue 21; ahead of
    everything, it did.) One with no output yet that entered the system (``arrival_time``) before
    some of those waiting here that hold nothing (moved or handed back before its first token,
    delayed on arrival) goes just ahead of the first of them, not behind: Llumnix keeps a migrated
    request's arrival_time and sorts the waiting queue by it (llumnix-ray #36). The policy batches,
    and the scheduler admits and preempts (the highest key first), by this key."""
    base = priority * PRIORITY_SPAN
    arrival = base + 2 * count
    mine = [s for s in seqs if s.status is Status.WAITING and base <= s.arrival < base + PRIORITY_SPAN]
    if resumed:
        arrival = min([arrival, *(s.arrival - 1 for s in mine if s.arrival % 2 == 0)])
    elif arrival_time is not None:
        # (one key below a later one's: an odd key, or an earlier-come one's even key, which it
        # then follows, equal keys keeping the order they were added in)
        later = [s.arrival for s in mine if not s.output_ids and not s.num_cached and s.arrival_time > arrival_time]
        arrival = min([arrival, *(a - 1 for a in later)])
    return arrival


def requeue(preempted: list[Sequence], seqs: Iterable[Sequence], holds: Callable[[str], bool], count: int) -> int:
    """Key the ``preempted`` sequences that were generating as ``fcfs_arrival`` keys a resumed one,
    in the order they had, ``count`` on from the engine's requests so far: behind the requests of
    their priority that hold KV (``holds``: half-prefilled prompts too, in vLLM's running list),
    ahead of those waiting behind them; the count after them. vLLM puts a preempted request at the front
    of its waiting queue and runs its running requests first; kept, a recompute's arrival put it
    ahead of decodes that arrived later, whose seats in a full step it took (a helper's fuzz)."""
    requeued = sorted((s for s in preempted if s.output_ids), key=lambda s: s.arrival)
    if requeued:
        gone = {s.request_id for s in preempted}
        kept = [s for s in seqs if s.request_id not in gone]
        for seq in requeued:
            # Only the waiting behind its priority's last holder: a prompt left waiting (another
            # adapter merged, too long for the blocks free) may sort before a later running decode,
            # and keyed below that prompt the recompute went ahead of the decode, and evicted it.
            held = [s.arrival for s in kept if s.priority == seq.priority and holds(s.request_id)]
            last = max(held, default=seq.priority * PRIORITY_SPAN - PRIORITY_SPAN)  # (priorities go below 0)
            behind = [s for s in kept if s.arrival > last and not holds(s.request_id)]
            seq.arrival = fcfs_arrival(count, True, behind, seq.priority)
            count += 1
    return count
