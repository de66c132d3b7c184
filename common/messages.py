"""Every message that crosses a process boundary, as msgspec Structs. No logic beyond validation."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

# Re-exported: the migrator's plans and moves (``common/plans.py``).
from dlora.common.plans import IlpFallback as IlpFallback
from dlora.common.plans import KVChunk as KVChunk
from dlora.common.plans import MovePlan as MovePlan
from dlora.common.plans import MoveRequest as MoveRequest
from dlora.common.plans import PlanMethod as PlanMethod
from dlora.common.plans import PlanTrigger as PlanTrigger
from dlora.common.plans import RequestLoad as RequestLoad
from dlora.common.reads import read_price

# Re-exported: the registry's records and events (``common/records.py``).
from dlora.common.records import AdapterEntry as AdapterEntry
from dlora.common.records import AdapterEvent as AdapterEvent
from dlora.common.records import AdapterRemoval as AdapterRemoval
from dlora.common.records import ApiKey as ApiKey

# Re-exported: the sampling parameters are part of this wire contract (``common/sampling.py``).
from dlora.common.sampling import MAX_STOP_CHARS as MAX_STOP_CHARS
from dlora.common.sampling import MAX_STOPS as MAX_STOPS
from dlora.common.sampling import SamplingParams as SamplingParams


class FinishReason(enum.StrEnum):
    """Why a request ended (OpenAI's finish_reason, and dlora's own two)."""

    STOP = "stop"  # EOS, a stop token or string, or a structured document complete
    LENGTH = "length"  # max_tokens, or the model's context is full
    ABORT = "abort"  # its client went away, or its sender aborted it (the last chunk a worker sends it)
    ERROR = "error"  # it failed; the chunk's error says why


class ErrorCode(enum.StrEnum):
    """Why a request failed; the gateway maps each to an HTTP status."""

    BAD_REQUEST = "bad_request"  # 400
    NOT_FOUND = "not_found"  # 404: unknown adapter
    UNAVAILABLE = "unavailable"  # 503: no worker can take it
    INTERNAL = "internal"  # 500: the server's fault (a bug, or an adapter's files it cannot load)


# Characters a cache_salt may hold: 256 bits base64-encoded (vLLM's advice) are 43.
MAX_CACHE_SALT = 1024


# Longest request id and reply reader name (characters). An application names them on NATS: a
# 5,000-character reply subject (or id in one) made the next publish to it pass NATS's 4 KiB control
# line, the server closed the publisher's connection, and nats-py never reconnects after a server's
# error (a helper's finding: every worker, then the dispatcher, cut off for good). The gateway
# takes a client's id of up to 256 and adds a choice's index.
MAX_NAME = 512
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
# Characters of an error a chunk carries: it may quote what a request named (an adapter, a regex,
# an unknown field), near NATS's max payload, and a chunk too large is never sent (a review: the
# application then waited for ever).
MAX_ERROR = 2000


def error_text(reason: str) -> str:
    """``reason`` as an error chunk carries it: at most ``MAX_ERROR`` characters."""
    return reason if len(reason) <= MAX_ERROR else reason[: MAX_ERROR - 1] + "…"


class GenerateRequest(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One generation request, published on ``subjects.REQUESTS`` by a gateway, or on
    ``subjects.requests_of(user)`` by an application connected as that NATS user. Fields left at
    their defaults are not sent: an application on a newer library that uses nothing new is read
    by an older dispatcher, which refuses a field it does not know (a helper's upgrade trial)."""

    # Unique per request; chunks and aborts refer to it. Not empty: "" ran, and a second one at
    # once was refused as already in flight (a trial).
    request_id: RequestId
    # Subject the token chunks go to (a NATS inbox the sender subscribed to first).
    reply_to: str
    # Adapter name; None: the base model.
    adapter: Name | None = None
    # The adapter's version (AdapterEntry.version) this request runs on, set where it enters; a
    # request sent without one takes the version registered when a worker first sees it.
    adapter_version: Name | None = None
    # Exactly one of prompt / prompt_token_ids.
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = SamplingParams()
    # Who is asking (accounting, fairness); free text.
    tenant: str = ""
    # Lower is served first (vLLM's priority scheduling); 0 is normal. The worker's engine orders
    # its requests by priority, then arrival: the policy batches and the scheduler admits them in
    # that order, and preempts the last of it first (``engine.sequence.fcfs_arrival``).
    priority: int = 0
    # vLLM's cache_salt: this request's prefix-cache blocks are found only by requests with the same
    # salt (a tenant's secret, against another timing its prompts' cache hits); "": shared by all.
    # At most MAX_CACHE_SALT characters (it is hashed into every block's key).
    cache_salt: str = ""
    # OpenAI's prompt_cache_key: requests that share it (a conversation's) go to the worker that
    # took the last of them, as their shared prefixes do (``dispatcher/affinity.py``); at most
    # MAX_CACHE_SALT characters. "": none.
    prompt_cache_key: str = ""
    # Requests of one group go to one worker while it is live, as one vLLM engine runs a request's
    # n samples: the gateway groups the choices of each prompt, so the prompt is computed once
    # (spread by load, each worker computed it: a user's trial). "": none. Kept per dispatcher
    # (several may each pick a worker), scoped to the sender, at most 128 requests a group.
    group: str = ""
    # Unix seconds after which the result is useless; None: no deadline. A worker does not start a
    # request past it, and stops one it holds (waiting or running) once it passes: the reader gets
    # the tokens sent so far, then an error chunk (UNAVAILABLE) saying so.
    deadline: float | None = None
    # Tokens already produced (resume after migration, preemption or a lost worker): generation
    # continues after them and they are not sent again.
    resume_token_ids: list[int] = []
    # How many of resume_token_ids, at the end, have had no text sent (a character split across
    # tokens is held back until complete): the resumed request sends their text with its first.
    resume_text_pending: int = 0
    # Text those tokens made that was not sent yet (held back while it could begin a stop string):
    # sent first, and a stop string is looked for across it (a move's, or the in-flight record's).
    resume_text_held: str = ""
    # Sequence number the next chunk carries (resumes continue the numbering).
    next_seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Unix seconds the request entered the system (gateway or app), for queue time.
    created: float = 0.0
    # A move that ships the KV cache: this many KVChunks follow on subjects.kv_transfer; 0: none (recomputed).
    kv_chunks: int = 0
    # Which shipment those chunks are (``KVChunk.transfer``): a request moved here, given up on its
    # cache, moved away and back could otherwise be given the first move's chunks, come late.
    kv_transfer: str = ""
    # Seconds the source spent exporting that cache (part of what the move cost).
    kv_export_s: float = 0.0
    # Seconds it waited unscheduled, before its first token, on the workers it was moved from.
    queued_s: float = 0.0
    # Times this request was re-dispatched because the worker running it died, hung or restarted.
    # A request whose workers keep dying may be what kills them: past ``MAX_RECOVERIES`` it fails
    # instead. It is also the request's fencing token: its in-flight record and its chunks carry
    # it, and a copy with a lower count (on a worker that hung and resumed) is refused.
    recoveries: int = 0
    # Who reads the replies: a process that announces itself with ``ClientAlive`` on
    # ``subjects.CLIENTS`` (a gateway) or ``subjects.clients_of(user)`` (an application, for a name
    # of its own: ``subjects.owns_client``; another's is cleared). When it has been silent for
    # ``heartbeat_ttl_s`` its requests are aborted wherever they run or wait; empty: never.
    client: Name = ""
    # The NATS user of the application that sent it, from the subject it came on
    # (``subjects.requests_of``), set by the dispatcher; "" for a gateway's. Only that user's
    # aborts (``subjects.aborts_of``) stop it.
    owner: str = ""
    # Its in-flight record was written before it was sent (by a dispatcher, or by the worker that
    # moved it): once that record is gone, the request ended or was given up here, and this copy
    # is fenced. False for a request published straight to a worker, which has no record to lose.
    recorded: bool = False
    # It was on another worker before (moved, recovered, handed over at a drain): set by the worker
    # that moves it and the dispatcher that re-dispatches it, cleared on an application's. Such a
    # request finishes on its adapter's version even once the adapter is removed; a new one does not.
    continued: bool = False
    # The base model its prompt was tokenized for (``model.config.model_digest``, set by a gateway;
    # "": not said, as an application's): run only by a worker of that model, else refused.
    model_digest: str = ""

    @property
    def fresh_from_app(self) -> bool:
        """An application's request that has not run anywhere yet: its adapter must be registered
        now, whatever version it names (a gateway's was checked when the gateway took it)."""
        return bool(self.owner) and not self.continued


# A request in flight on a worker that died (or hung, or restarted) is retried elsewhere this many
# times, then failed: a poison request must not take down one worker after another. A request
# whose message never reached its worker is re-dispatched without counting.
MAX_RECOVERIES = 1
# Seconds a request handed back (``LostRequests``, not run there) is remembered: by the worker that
# handed it back, which answers it if it comes back within them (no other worker could take it),
# and by the dispatcher, which sends it to none of the workers that handed it back while another can.
HANDED_BACK_MEMORY_S = 60.0
# Requests so remembered at once, by each: a worker refusing every request of a busy adapter hands
# back thousands a minute, and the memory must stay bounded.
MAX_HANDED_BACK = 100_000
# Workers a request's in-flight record remembers as having handed it back (the latest kept): the
# dispatcher that re-dispatches it may not be the one a hand-back reached (``LostRequests`` go to
# any of them), so the record carries them (``Inflight.handed_back``); a record stays small however
# many workers refuse it, and past this many, the earliest is chosen again and answers it itself.
MAX_HANDED_BACK_BY = 32


class Usage(msgspec.Struct, kw_only=True, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    # Of the prompt's tokens, how many its prefill found in the worker's prefix cache (OpenAI's
    # prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One generated token's log-probability and the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []  # (token id, log-probability), most likely first
    # A prompt token's rank in the vocabulary: how many tokens are at least as likely (vLLM's, so
    # 1 is the most likely); 0: not counted (generated tokens). Last, so a reader of the three
    # fields before it takes the array as it did (msgspec skips trailing elements it lacks).
    rank: int = 0


class TokenChunk(msgspec.Struct, kw_only=True, frozen=True):
    """New tokens of one request, published on its ``reply_to``. The last one has ``finish_reason``
    (or ``error``); ``seq`` counts chunks from 0 so a reader can drop duplicates after a resume.
    A chunk with ``error`` ends the request whatever its ``seq`` (a failed recovery numbers it from
    the in-flight record, which can lag what the reader has)."""

    request_id: str
    seq: int
    token_ids: list[int] = []
    text: str = ""
    finish_reason: FinishReason | None = None  # set on the last chunk
    # With finish_reason "stop": the stop string or stop token id that ended it; None for EOS or a
    # complete structured document (vLLM's stop_reason).
    stop_reason: str | int | None = None
    usage: Usage | None = None
    error: str | None = None  # a failed request's only chunk: a reason for the caller
    error_code: ErrorCode | None = None
    # With a BAD_REQUEST error: the request's field at fault as SamplingParams names it (a
    # structured output that fails as the output grows: "regex", "json_schema", ...), or None.
    param: str | None = None
    worker: str = ""  # the one that produced it
    # First chunk only: seconds from arrival at the worker to the first step that ran it, and from
    # that step to this token (vLLM's request_prefill_time; None from an older worker).
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    # On the first chunk of a request's first run: of its prompt, the tokens its prefill found in
    # the prefix cache. ``usage.cached_tokens`` says the same at the end, unless the request was
    # moved or recovered meanwhile: then it is the recompute's (a reader keeps this one).
    prompt_cached_tokens: int | None = None
    # One per token in token_ids when the request asked for logprobs.
    logprobs: list[TokenLogprob] = []
    # On the first chunk of a request that asked for prompt_logprobs: entry i is prompt token
    # i + 1's log-probability after the ones before it (the first prompt token has none).
    prompt_logprobs: list[TokenLogprob] = []
    # The request's ``recoveries`` where this chunk was made: once a later attempt has spoken, a
    # reader drops an earlier one's chunks (a worker that hung, was given up and resumed).
    recoveries: int = 0


class AbortRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Stop a request wherever it runs (client gone); published on ``subjects.ABORT`` by a gateway,
    or on ``subjects.aborts_of(user)`` by an application (then only its own requests stop)."""

    request_id: RequestId


class CancelResponse(msgspec.Struct, kw_only=True, frozen=True):
    """End a background response of the Responses API wherever it runs (cancelled or deleted);
    published on ``subjects.RESPONSE_CANCELS`` by the gateway asked to, heard by every gateway
    (only gateways may publish it): the one running it cancels its task."""

    response_id: str
    tenant: str  # its API key's tenant ("" without keys): ids are each tenant's own
    # The gateway that sent it, which stopped its own run at once and ignores its echo: heard back
    # after a retry under the same id had started anew there, it cancelled the new run.
    gateway: str = ""


class ClientAlive(msgspec.Struct, kw_only=True, frozen=True):
    """A reply reader saying it is there, every second or so on ``subjects.CLIENTS`` (gateways) or
    ``subjects.clients_of(user)`` (applications; see ``GenerateRequest.client``)."""

    client: Name
    # Times its NATS connection came back: when it grows, workers send their recent replies to it
    # again (those of its requests, and any on its replies_of subjects): it may have missed them.
    reconnects: int = 0
    # Its process's start (a token of its own, ``clients.announce``): a new one is a reader started
    # again, which has none of its replies (they are sent again too). "": not said.
    incarnation: Name = ""


class LostRequests(msgspec.Struct, kw_only=True, frozen=True):
    """Requests recorded in flight on ``worker`` that it does not hold (it restarted, or their
    message never came), each with its record's ``recoveries``; published by the worker on
    ``subjects.LOST`` for one dispatcher to re-dispatch those whose record is still unchanged."""

    worker: str
    requests: dict[str, int]
    # Those of ``requests`` recorded as sent to the incarnation handing them back: their message
    # never came, and the re-dispatch does not count as a death (``MAX_RECOVERIES``).
    never_arrived: list[str] = []
    # Handed over by a worker that is stopping (``drain_timeout_s``): not a death either.
    draining: bool = False
    # Those of ``never_arrived`` whose adapter version this worker cannot load (its files were
    # rewritten since registration): sent only to a worker that holds that version, else failed.
    elsewhere: list[str] = []
    # Of ``requests``, those with no token yet: seconds each waited unscheduled here and where it
    # was moved from (``GenerateRequest.queued_s`` for its next attempt).
    queued_s: dict[str, float] = {}


class PrefixCacheReset(msgspec.Struct, kw_only=True, frozen=True):
    """Forget the prefix cache (an admin's ``POST /reset_prefix_cache``), broadcast on
    ``subjects.PREFIX_CACHE_RESET``; each worker answers on the message's reply subject."""


class PrefixCacheResetDone(msgspec.Struct, kw_only=True, frozen=True):
    worker: str
    blocks: int  # the cached blocks it forgot


class AdapterResidency(msgspec.Struct, kw_only=True, frozen=True):
    name: str
    slot: int | None  # device slot, None: host memory only
    merged: bool
    version: str = ""  # which version of the adapter this is (a worker may briefly hold two)

    @property
    def tier(self) -> str:
        """Where it lives: "gpu" in a device slot or merged into the weights on the device (a merged
        adapter needs no slot), else "cpu" (host memory). On a CPU-only worker "gpu" still names
        its device slots."""
        return "gpu" if self.slot is not None or self.merged else "cpu"


class WorkerStats(msgspec.Struct, kw_only=True, frozen=True):
    """A worker's load and residency, published on ``subjects.stats(worker)`` every interval."""

    worker: str
    # Unique to one start of the worker process: a new value means it restarted.
    incarnation: str = ""
    # When that start was let through (Unix seconds, Redis's clock; 0: an older worker that does
    # not say): of two processes beating under one id, the later start keeps it (worker/one_id.py).
    started: float = 0.0
    # Stopping: it finishes what it runs (or hands it back) and must be given nothing new, nor
    # be moved to or from.
    draining: bool = False
    running: int
    waiting: int
    # Of the waiting, those preempted (their KV freed) and not yet back in the running batch.
    preempted: int = 0
    # Free KV blocks and their size, for placement.
    free_blocks: int
    total_blocks: int
    block_size: int
    max_loras: int
    # Tokens one request may hold here, prompt and output: the model's context or the KV cache,
    # whichever is smaller (0: an older worker that does not say).
    max_model_len: int = 0
    # The highest adapter rank it loads (its adapter_limits.max_lora_rank; 0: an older worker that does not say).
    max_lora_rank: int = 0
    # Its base model (``model.config.model_digest``; "": an older worker): requests of another model
    # are not sent or moved to it.
    model_digest: str = ""
    # The time to live of its heartbeat key, seconds (set as it is written to Redis; 0 on NATS, and
    # from an older worker): how long ago it beat is that less the key's time left.
    heartbeat_ttl_s: float = 0.0
    # It marks each request's record as taken up before working on it (``StateStore.mark_taken``):
    # only then may its loss go uncounted as a death of a request it never took. False from an
    # older worker, whose loss counts as every recorded request's death (a rolling upgrade).
    marks_taken: bool = False
    # What it serves on: a torch device ("cuda:0", "cpu") and dtype ("bfloat16"); empty from an older worker.
    device: str = ""
    dtype: str = ""
    adapters: list[AdapterResidency] = []
    # The adapter versions being read into host memory here, as (name, version): a request of one
    # joins its read. None: an older worker that does not say (its requests of an adapter are
    # taken as joining a read of whatever version a new one runs on).
    reading: list[tuple[str, str]] | None = None
    # How its last step ran: "merged", "unmerged" or "mixed" (policy.Mode); "" before any step.
    mode: str = ""
    # Counters since start.
    steps: int = 0
    merges: int = 0
    preemptions: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    adapter_load_seconds: float = 0.0
    # Prompt tokens looked up in the prefix cache, and of those found cached (vLLM's
    # prefix_cache_queries and prefix_cache_hits).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Output tokens of the requests that finished here lately, as 16 quantiles (a request its bound
    # stopped counted at that bound): what a dispatcher prices a new request's output at. Empty
    # before 8 finished.
    output_tokens_quantiles: list[int] = []
    # Measured seconds of step time per generated token (prefill included); 0 before any step.
    seconds_per_token: float = 0.0
    # The same per adapter ("" for the base model): each step's time shared by the tokens fed, over
    # the tokens its requests generated here. Adapters that ran unmerged beside many others, at a
    # high rank or with long prompts cost more; those that have not run here are absent.
    adapter_seconds_per_token: dict[str, float] = {}
    # Measured seconds per prompt token fed (what recomputing a moved request costs); 0 before any.
    prefill_seconds_per_token: float = 0.0
    # Measured seconds an adapter's read from its files into host memory takes here (recent reads,
    # decayed): what sending a request of an adapter it lacks costs; 0 before any.
    adapter_read_seconds: float = 0.0
    # The mean bytes of the files of those reads, weighted alike, and the seconds a byte more by
    # the line fitted to them (None: their sizes hardly varied): an adapter of n bytes is priced on
    # that line, else in proportion to n (``read_seconds``). 0 / None before any.
    adapter_read_bytes: float = 0.0
    adapter_read_seconds_per_byte: float | None = None
    # Adapters whose read failed here lately (names; refused here for a while, ``FAILED_MEMORY_S``):
    # requests of them sent here do not join a read.
    failed_adapters: list[str] = []
    # Measured seconds per token of the moved KV caches taken here: the source's export plus this
    # worker's stall (chunks still missing when the request came, decoding, loading); 0 before any.
    kv_transfer_seconds_per_token: float = 0.0
    # The tokens behind those two measurements (the migrator weighs workers' figures by them).
    prefill_tokens: int = 0
    kv_transfer_tokens: int = 0
    # Every unfinished request here (the migrator's view of the load), up to ``MAX_LISTED``: past it
    # the rest (the latest to arrive) are only counted, with their remaining tokens (and those waiting
    # on arrival's, not in unlisted_requests), so the stats fit one NATS message (~65 B a request).
    requests: list[RequestLoad] = []
    unlisted_requests: int = 0
    unlisted_remaining_tokens: int = 0
    # The requests not in ``requests`` (those past it, and those waiting on arrival for a grammar, a
    # moved cache or their tokens) by adapter ("" the base model) as [running, waiting].
    unlisted_by_adapter: dict[str, tuple[int, int]] = {}
    # Unix seconds when sent.
    sent: float = 0.0
    # Seconds between its stats (its ``stats_interval_s``): a plan made from stats older than
    # ``PLAN_MAX_AGE_S`` past it is dropped there (``worker.moves.plan_max_age``). 0: an older
    # worker that does not say (the migrator takes its last gap between two stats instead).
    stats_interval_s: float = 0.0
    # Unix seconds when this state was read: between two steps, and a worker publishes the last
    # reading, so while a step runs it may be older than ``sent``. 0: a worker from before it.
    taken: float = 0.0
    # ``unlisted_by_adapter`` by ``engine_key`` (a slot each); None: an older worker (by name then).
    unlisted_by_version: dict[str, tuple[int, int]] | None = None
    # The KV blocks the requests not in ``requests`` need for their contexts so far: those past it,
    # and those waiting on arrival (a moved one's prompt and the tokens it made, its cache on the
    # way; a prompt still text counts none). Uncounted, a worker that had just taken a plan's moves
    # looked as roomy as before, and the next plan filled it again. 0: an older worker.
    unlisted_kv_blocks: int = 0
    # The blocks of the requests here that hold none yet, so not taken from ``free_blocks``: those
    # waiting on arrival (a moved one's cache on its way, a grammar compiling) and those queued in
    # the engine (a move by recompute among them), each its context so far (prefix cache hits not
    # subtracted: an upper bound). Running ones hold theirs already. 0: an older worker (or none).
    arriving_kv_blocks: int = 0
    # Plan id -> the requests of its moves this worker refused lately (``worker/moves.py``'s
    # ``Refusals``): they stay here, free for the migrator's next plan (not pinned as moved, for
    # ``settle_s``). Empty from an older worker: its refused moves stay pinned, as before.
    refused_moves: dict[str, list[str]] = {}

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of its KV blocks in use, 0 to 1 (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def merged_adapter(self) -> str | None:
        """The adapter merged into its weights now (None: none)."""
        return next((a.name for a in self.adapters if a.merged), None)

    def requests_by_adapter(self) -> dict[str, list[int]]:
        """[running, waiting] requests per adapter ("" the base model), listed or not, in arrival
        order (the listed first: dispatch's dominant adapter is the first seen of equals)."""
        out: dict[str, list[int]] = {}
        for r in self.requests:
            out.setdefault(r.adapter or "", [0, 0])[0 if r.running else 1] += 1
        for adapter, (running, waiting) in self.unlisted_by_adapter.items():
            n = out.setdefault(adapter, [0, 0])
            n[0], n[1] = n[0] + running, n[1] + waiting
        return out

    def read_seconds(self, nbytes: float) -> float:
        """Seconds a read of an adapter of ``nbytes`` (its ``AdapterEntry.file_bytes``) takes here
        (``read_price``); 0 before any read."""
        line = self.adapter_read_seconds, self.adapter_read_bytes, self.adapter_read_seconds_per_byte
        return read_price(*line, nbytes)


def likely_dead(silent_s: float, ttl_s: float, gap_s: float, interval_s: float) -> bool:
    """A worker silent ``silent_s`` is likely dead or hung (not yet past the heartbeat TTL ``ttl_s``
    and declared lost: the caller bounds that): past half the TTL and three of its last gap between
    stats ``gap_s``, taken as at least the stats interval it says ``interval_s``
    (``WorkerStats.stats_interval_s``; 0 where none is said, or no gap yet). Dispatch passes such
    workers over (``DispatchState.quiet``, which says why the gap and the interval) and the migrator
    leaves them out of its plans (``looks.unheard``)."""
    return max(ttl_s / 2, 3 * max(gap_s, interval_s)) < silent_s


# Requests a worker's stats list one by one: 4,096 x ~65 bytes is ~270 KB, a quarter of NATS's
# default max_payload (1 MB), which the adapters (at most max_cpu_loras) share.
MAX_LISTED = 4096


class Placement(msgspec.Struct, kw_only=True, frozen=True):
    """Where adapter replicas should live (dispatcher's burst-tolerant placement), published on
    ``subjects.PLACEMENT``: each worker loads its adapters ahead of the requests that need them."""

    # worker -> adapters it should hold
    workers: dict[str, list[str]] = {}
