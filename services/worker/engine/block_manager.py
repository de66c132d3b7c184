"""The paged KV cache's bookkeeping: which physical blocks each sequence holds, and which full blocks
are cached for reuse by their content (automatic prefix caching). Pure: no tensors, no I/O.

A sequence's KV lives in fixed-size blocks scattered over one pool; its block table maps logical
block i (tokens [i*block_size, (i+1)*block_size)) to a physical block. Token t of a sequence is
stored at flat slot ``table[t // block_size] * block_size + t % block_size``.

**Prefix caching** (as vLLM's automatic prefix caching, keyed so a hit is always the same KV): a
full block is named by a hash chain, ``hash(parent's hash, its token ids, cache key)``, where the
cache key says which weights computed it: the adapter's *content* digest (its config and weights,
never its name, so an adapter registered again under the same name with other weights never
reads the old KV; vLLM #42125) and the digest of the adapter merged into the base weights while
it was computed. The second part is there because merged and unmerged execution do not produce
the same KV: ``x (W + s·BA)`` and ``x W + s·(x A) B`` round differently, and in half precision
the merged weight itself loses the delta's low bits (tests/engine/test_prefix_cache.py measures
it). A block whose tokens were computed under two merged states is not cached, nor any block after
it in that sequence (its chain would name KV that no single state produces), nor a block
computed under another state than the blocks before it (a lookup names a prompt's blocks under
one key: none would reach it).

**Block 0 is nobody's** (vLLM's null block): the torch attention pads every block table with it
and reads whole blocks, hiding keys past a context by a mask, under which a key weighs 0, but
0 · NaN is NaN. So what lies past a context must be finite: block 0 is never given out (never
written: zero), and every block a sequence is given is zeroed before a step reads it
(``take_fresh``), so NaN K/V that a request whose activations overflowed wrote reach only that
request, in any later batch (vllm-project/vllm#50283 zeroes reused blocks alike). Blocks are
numbered 1 .. num_blocks; the KV cache holds ``end`` of them (and any scratch after).

Blocks are reference-counted: a cached block may be in several sequences' tables. One that no
sequence holds stays cached and is reused only when no never-cached block is free, least
recently released first (a sequence releases its tail first, so a shared prefix outlives the
turns that extended it).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

# A block's hash chain starts from this parent.
_ROOT = b"dlora-prefix-v1"


def block_hash(parent: bytes, token_ids: list[int], cache_key: bytes) -> bytes:
    """The name of a full block: 16 bytes of BLAKE2b over its parent's name, its token ids and the
    cache key (which weights computed its KV)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    h.update(cache_key)
    return h.digest()


@dataclass
class _Held:
    """One sequence's blocks and how far its chain of cached blocks goes."""

    table: list[int] = field(default_factory=list)
    chain: list[bytes] = field(default_factory=list)  # names of its leading full blocks, in order
    # The cache key of the tokens computed so far in the block after the chain: None before any,
    # or False once two keys have been seen there (then nothing more of this sequence is cached).
    open_key: bytes | None | bool = None
    # The cache key its chain's blocks were found or computed under (None: no chain yet). A lookup
    # names every block of a prompt under one key: a block named under another after them would be
    # reached by none, so a sequence whose key changes caches nothing more.
    chain_key: bytes | None = None
    # Where its last step's names begin in ``chain``: NaN in that step's logits may have spoiled
    # those, not the ones before, which a step with finite logits read (a key or value not finite
    # makes every later token's logits so). 0 through its first step: that step read the blocks
    # it reused before any step of its own had looked at them.
    last_step: int = 0
    stepped: bool = False


class BlockManager:
    """Hands out physical blocks to sequences and (with ``enable_prefix_caching``) keeps full
    blocks' KV for later sequences with the same prefix."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        """ValueError when ``num_blocks`` or ``block_size`` is below 1."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks + 1))  # never cached, or no longer
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by none: LRU first
        self._ref = [0] * (num_blocks + 1)
        self._fresh: set[int] = set()  # given out since ``take_fresh``: their content is another's
        self._name_of: dict[int, bytes] = {}  # cached blocks' names
        self._cached: dict[bytes, int] = {}  # name -> block
        self._held: dict[str, _Held] = {}
        self._forgotten: set[int] = set()  # blocks ``forget`` took out of the cache since ``checked``
        # The blocks, with their names, that sequences named at their last step and freed since
        # ``checked``: one preempted or aborted while its step is in flight (async scheduling) is
        # looked at after it freed them.
        self._released: dict[str, list[tuple[bytes, int]]] = {}

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never cached, or cached and held by none."""
        return len(self._free) + len(self._evictable)

    @property
    def end(self) -> int:
        """One past the last block given out: the blocks a KV cache needs, the pad block 0 too."""
        return self.num_blocks + 1

    def take_fresh(self) -> list[int]:
        """The blocks given to sequences since the last call, for the KV cache to zero before a
        step writes or reads them (a block given out and freed since is listed as well: zeroing it
        is harmless). Blocks taken from the prefix cache by ``reuse_prefix`` are not: full blocks,
        read only inside the context they name."""
        fresh = sorted(self._fresh)
        self._fresh.clear()
        return fresh

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        held = self._held.get(seq_id)
        return held.table if held is not None else []

    def holds(self, seq_id: str) -> bool:
        return bool(self.table(seq_id))

    def capacity(self, seq_id: str) -> int:
        """Tokens ``seq_id`` can hold in the blocks it has (0: none)."""
        return len(self.table(seq_id)) * self.block_size

    def extra_blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so ``seq_id`` can hold ``num_tokens`` tokens (0 if it already can)."""
        return max(0, self.blocks_for(num_tokens) - len(self.table(seq_id)))

    def freeable(self, seq_ids: Iterable[str]) -> int:
        """Blocks that freeing all of ``seq_ids`` would give back (one another holds too stays held)."""
        refs = Counter(block for seq_id in seq_ids for block in self.table(seq_id))
        return sum(n == self._ref[block] for block, n in refs.items())

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq_id, num_tokens) <= self.num_free

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Make ``seq_id`` hold ``num_tokens`` tokens. MemoryError if blocks run out (check can_grow)."""
        need = self.extra_blocks_needed(seq_id, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"{seq_id}: needs {need} blocks, {self.num_free} free")
        held = self._held.setdefault(seq_id, _Held())
        held.table.extend(self._take() for _ in range(need))

    def free(self, seq_id: str) -> None:
        """Release every block of ``seq_id``, its last block first; a no-op for an unknown sequence.
        A cached block nobody holds any more stays cached until its block is needed."""
        held = self._held.pop(seq_id, None)
        if held is not None and len(held.chain) > held.last_step:
            self._released.setdefault(seq_id, []).extend(_last_step(held))
        for block in reversed(held.table if held is not None else []):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._name_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Flat cache slots of tokens [start, end) of ``seq_id``."""
        table, bs = self._held[seq_id].table, self.block_size
        return [table[t // bs] * bs + t % bs for t in range(start, end)]

    # ---- prefix caching ---------------------------------------------------------------------
    def reuse_prefix(self, seq_id: str, token_ids: list[int], cache_key: bytes) -> int:
        """Give ``seq_id`` (holding nothing) the cached blocks that begin ``token_ids`` under
        ``cache_key``; the number of tokens whose KV they hold (a multiple of ``block_size``). The
        last token is never taken from the cache: its logits are needed, so it is computed.
        ValueError if ``seq_id`` already holds blocks."""
        if self.holds(seq_id):
            raise ValueError(f"{seq_id} already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        held = self._held[seq_id] = _Held()
        bs, parent = self.block_size, _ROOT
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            name = block_hash(parent, token_ids[start : start + bs], cache_key)
            block = self._cached.get(name)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            held.table.append(block)
            held.chain.append(name)
            parent = name
        held.chain_key = cache_key if held.chain else None
        return len(held.table) * bs

    def cached_tokens(self, token_ids: list[int], cache_key: bytes, names: list[bytes]) -> int:
        """Tokens of ``token_ids`` that cached blocks hold under ``cache_key``: what ``reuse_prefix``
        would take now. Looks only; takes nothing. ``names``: the blocks' names hashed so far for
        these ids and key (empty at first), extended as far as this look needs: a caller that
        looks again step after step hashes each block once."""
        if not self.enable_prefix_caching:
            return 0
        bs, parent, run = self.block_size, _ROOT, 0
        for start in range(0, len(token_ids) - bs, bs):
            if run == len(names):
                names.append(block_hash(parent, token_ids[start : start + bs], cache_key))
            if names[run] not in self._cached:
                break
            parent = names[run]
            run += 1
        return run * bs

    def unheld(self, names: list[bytes], count: int) -> int:
        """Of the first ``count`` blocks ``names`` names (cached: ``cached_tokens`` found them), those
        no sequence holds: ``reuse_prefix`` takes them out of ``num_free``."""
        return sum(self._ref[self._cached[name]] == 0 for name in names[:count])

    def fills_block(self, start: int, end: int) -> bool:
        """Whether computing tokens [start, end) completes a block (``computed`` then reads ids)."""
        return end // self.block_size > start // self.block_size

    def upcoming_share(self, seq_id: str, token_ids: list[int], cache_key: bytes, upcoming: set[bytes]) -> int:
        """Tokens after the blocks ``seq_id`` holds from the cache whose blocks are named in
        ``upcoming`` (what other prefills of this step will cache: ``upcoming``), in a run from its
        first block not found; never its last token's block, which ``reuse_prefix`` never takes."""
        held = self._held.get(seq_id)
        if held is None or not upcoming:
            return 0
        bs, run = self.block_size, 0
        parent = held.chain[-1] if held.chain else _ROOT
        for start in range(len(held.chain) * bs, len(token_ids) - bs, bs):
            parent = block_hash(parent, token_ids[start : start + bs], cache_key)
            if parent not in upcoming:
                break
            run += bs
        return run

    def upcoming(self, seq_id: str, token_ids: list[int], start: int, end: int, cache_key: bytes) -> list[bytes]:
        """The names ``computed`` would give the blocks that computing tokens [start, end) of
        ``seq_id`` completes, changing nothing (the scheduler's view of what a step will cache)."""
        held = self._held.get(seq_id)
        if held is None or not self._extends_chain(held, start, end) or not _one_key(held, cache_key):
            return []
        return self._chain(held, token_ids, end, cache_key)

    def computed(self, seq_id: str, token_ids: list[int], start: int, end: int, cache_key: bytes) -> None:
        """Tokens [start, end) of ``seq_id`` (``token_ids`` are all its tokens so far; may be empty
        when ``fills_block(start, end)`` is false) had their KV written by weights named
        ``cache_key``: cache each block this completes, unless its tokens were computed under two
        keys (then nothing more of the sequence is cached)."""
        held = self._held.get(seq_id)
        if held is not None:  # its last step is this one from now on
            held.last_step = len(held.chain) if held.stepped else 0
            held.stepped = True
        if held is None or not self._extends_chain(held, start, end):
            return
        if not _one_key(held, cache_key):
            held.open_key = False
            return
        held.open_key = held.chain_key = cache_key
        for name in self._chain(held, token_ids, end, cache_key):
            block = held.table[len(held.chain)]
            held.chain.append(name)
            if name not in self._cached:  # else another sequence cached the same KV first
                self._cached[name] = block
                self._name_of[block] = name
        if end % self.block_size == 0:
            held.open_key = None

    def _extends_chain(self, held: _Held, start: int, end: int) -> bool:
        """Whether computing tokens [start, end) may name more of ``held``'s blocks: caching is on,
        its chain is not broken, and this is not a recomputation of what the chain names."""
        return (
            self.enable_prefix_caching
            and held.open_key is not False
            and start < end
            and len(held.chain) * self.block_size <= start
        )

    def _chain(self, held: _Held, token_ids: list[int], end: int, cache_key: bytes) -> list[bytes]:
        """The names of the blocks after ``held``'s chain up to token ``end``'s block, exclusive
        of a block ``end`` leaves unfilled."""
        bs, names = self.block_size, []
        parent = held.chain[-1] if held.chain else _ROOT
        for b in range(len(held.chain), end // bs):
            parent = block_hash(parent, token_ids[b * bs : (b + 1) * bs], cache_key)
            names.append(parent)
        return names

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (vLLM's ``reset_prefix_cache``, SGLang's ``flush_cache``): no
        block cached before is found by a later lookup; blocks nobody holds are free again, and
        the sequences running keep theirs and go on caching the blocks they complete. The number
        of blocks that were cached."""
        forgotten = len(self._cached)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._name_of.clear()
        return forgotten

    def forget(self, seq_id: str) -> None:
        """Take out of the prefix cache the blocks ``seq_id`` named at its last step, those it
        reused too if that was its first, and those it so named and freed since ``checked``
        (preempted or aborted while its step was in flight): that step's logits were not finite,
        so the KV it wrote may be NaN, and so may a reused block's until a step of its own read it
        with finite logits. Blocks named before its last step stay: that step read them (the engine
        looks at a step's logits before it names the next step's blocks). So do another's blocks of
        the same names, whose maker's own check answers for them. Sequences holding them keep them;
        a later prompt computes them again (vLLM evicts a NaN request's blocks alike,
        vllm-project/vllm#50283); ``checked`` lists them. A no-op for an unknown sequence."""
        held = self._held.get(seq_id)
        named = _last_step(held) if held is not None else []
        for name, block in named + self._released.get(seq_id, []):
            if self._cached.get(name) != block:  # another's of the same name, or no longer cached
                continue
            del self._cached[name]
            del self._name_of[block]
            self._forgotten.add(block)
            if self._ref[block] == 0:
                del self._evictable[block]
                self._free.append(block)
        if held is not None:
            held.open_key = False  # nothing more of it is cached either

    def stepped(self, seq_id: str) -> bool:
        """Whether a step of ``seq_id``'s own was named since it took its blocks: once that step's
        logits are looked at, finite, they vouch for every block it read."""
        held = self._held.get(seq_id)
        return held is not None and held.stepped

    def checked(self) -> set[int]:
        """The blocks ``forget`` took out of the cache since the last call: a sequence holding one
        took it from the cache before its maker's logits were looked at (async scheduling). The
        names of freed blocks kept for ``forget`` go: every step that ran them was looked at."""
        forgotten, self._forgotten = self._forgotten, set()
        self._released.clear()
        return forgotten

    def stop_caching(self, seq_id: str) -> None:
        """Cache nothing more of ``seq_id``: its KV came from elsewhere (a moved request)."""
        if seq_id in self._held:
            self._held[seq_id].open_key = False

    def _take(self) -> int:
        """A block for a sequence: a never-cached one if any, else the least recently released
        cached one, which stops being cached."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._name_of.pop(block)]
        self._ref[block] = 1
        self._fresh.add(block)
        return block


def _one_key(held: _Held, cache_key: bytes) -> bool:
    """Whether KV computed under ``cache_key`` may extend ``held``'s chain: what it holds of the
    block after the chain, and the chain, were computed under the same key (or there are none)."""
    return held.open_key in (None, cache_key) and held.chain_key in (None, cache_key)


def _last_step(held: _Held) -> list[tuple[bytes, int]]:
    """The names ``held``'s last step gave (through its first, those it reused too), with their blocks."""
    return list(zip(held.chain[held.last_step :], held.table[held.last_step :]))
