"""The text `dlora loadgen --backend openai-chat` sends for a workload's prompt ids: as many tokens
as the workload asked for, re-encoded by the server's tokenizer (the tiny model's, no servers)."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from dlora.loadgen import main
from dlora.loadgen.main import made_chat_texts
from dlora.loadgen.prompt_text import DROPS, TRIES, chat_texts, ordinary_ids, text_of_length
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.workload import RequestSpec, build_specs, load_traces, prompt_ids
from dlora.model.make_tiny import TinyOutput
from dlora.model.tokenizer import load_tokenizer
from tests.conftest import SPECIAL_IDS


@pytest.fixture(scope="module")
def tok(tiny_llama: TinyOutput) -> Any:
    return load_tokenizer(tiny_llama.model)


def _tokens(tok: Any, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def test_the_default_workloads_chat_prompts_keep_their_lengths(tok: Any) -> None:
    """`make run`, then `dlora loadgen --backend openai-chat --tokenizer .cache/demo/model`: the
    prompts' ids decoded came back ~1.45x as many tokens (U+FFFD for a byte that is no character,
    three bytes again), and every request of the default workload (256-token prompts, 128 out) was
    refused past the demo's 512-token context (a new user's trial; vLLM #17408's kind)."""
    specs = build_specs(WorkloadSpec(requests=60), load_traces(WorkloadSpec(requests=60)))
    prompts = [prompt_ids(i, s) for i, s in enumerate(specs)]
    assert sum(_tokens(tok, tok.decode(p)) for p in prompts) > 1.3 * sum(map(len, prompts))  # the drift
    got = [_tokens(tok, text_of_length(tok, p)) - len(p) for p in prompts]
    assert max(got) <= 0  # never longer than the workload's
    assert sum(d == 0 for d in got) >= 0.6 * len(got) and min(got) >= -3  # mostly exact, else a token or two short


def test_text_that_encodes_back_whole_is_sent_as_decoded(tok: Any) -> None:
    ids = tok.encode("kalo remi suta nevo rida", add_special_tokens=False)
    assert text_of_length(tok, ids) == tok.decode(ids)


def test_a_long_prompt_is_cut_and_filled_within_its_tries(tok: Any) -> None:
    """Filled from its own tokens, never a list the length of the prompt squared (8k ids)."""
    ids = [3 + (i * 7919) % 250 for i in range(8192)]
    assert 8192 - 3 <= _tokens(tok, text_of_length(tok, ids)) <= 8192


class _Counting:
    """The tokenizer, counting its encodes and decodes."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.calls = tok, 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        self.calls += 1
        return str(self.tok.decode(ids))


def test_the_runs_texts_are_made_before_it_not_as_each_request_is_sent(tok: Any) -> None:
    """Made at send time, each cost ~5 ms (256 tokens) to ~45 ms (8k) of the event loop that
    times the sends, where vLLM builds its dataset first."""
    specs = build_specs(WorkloadSpec(requests=8), load_traces(WorkloadSpec(requests=8)))
    prompts = [prompt_ids(i, s) for i, s in enumerate(specs)]
    counting, progress = _Counting(tok), list[int]()
    text = chat_texts(counting, prompts, progress.append)
    made = counting.calls
    assert made > 0 and [text(i, p) for i, p in enumerate(prompts)] == [text_of_length(tok, p) for p in prompts]
    assert counting.calls == made  # nothing tokenized while sending
    assert progress == list(range(1, 9))  # each made told (a large run's took minutes, saying nothing)
    assert _tokens(tok, text(8, [5, 6, 7])) == 3 and counting.calls > made  # a warm-up's prompt: made when asked


def test_the_runs_texts_hold_about_their_utf8_and_nothing_keyed_by_the_ids(tok: Any) -> None:
    """Each text was kept under its ids' tuple, 8 bytes a token more than the text: 2.6 GB at
    10,000 prompts of 32k tokens. Kept by index as UTF-8, what the texts hold is about their bytes."""
    vocab = ordinary_ids(tok)
    spec = WorkloadSpec(requests=40, lengths="fixed", prompt_len=512, output_len=2)
    prompts = [prompt_ids(i, s, ids=vocab) for i, s in enumerate(build_specs(spec))]
    tracemalloc.start()
    try:
        text = chat_texts(tok, prompts)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    utf8 = sum(len(text(i, p).encode()) for i, p in enumerate(prompts))
    assert held < 1.5 * utf8, (held, utf8)  # (keyed by tuples: 7x)


def test_a_prompt_whose_rounds_come_back_round_stops_there(tok: Any) -> None:
    """A quarter of the default workload's prompts end a token or two short: cut within a
    character, filled, cut again, the same each round. All ten rounds were gone through, 40-50
    encodes a prompt where 2-8 give the same text (the run's texts are made before its start)."""
    specs = build_specs(WorkloadSpec(requests=60), load_traces(WorkloadSpec(requests=60)))
    short = 0
    for ids in (prompt_ids(i, s) for i, s in enumerate(specs)):
        counting = _Counting(tok)
        text = text_of_length(counting, ids)
        short += _tokens(tok, text) < len(ids)
        assert counting.calls < 2 * TRIES, (len(ids), counting.calls)  # an encode and a decode a round, the least
    assert short > 0  # such prompts are among them


class _PrefixSpace:
    """A character tokenizer whose encode puts a space before the text and whose decode keeps it
    (a dummy prefix, as SentencePiece's, not stripped): no text encodes back to its tokens."""

    def __init__(self) -> None:
        self.encodes = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encodes += 1
        return [ord(c) for c in " " + text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_a_tokenizer_whose_text_never_encodes_back_costs_a_few_encodes_a_round() -> None:
    """Cut back one token at a time to a whole character, the whole prompt re-encoded each time,
    down to nothing, every round: 2,000 ids took ~20,000 encodes of up to 2,000 characters."""
    odd = _PrefixSpace()
    assert isinstance(text_of_length(odd, [ord("a") + i % 26 for i in range(2000)]), str)
    assert odd.encodes <= TRIES * (DROPS + 1)


def test_a_tokenizers_special_ids_are_left_out_of_the_prompts_drawn(special_tokenizer: Path) -> None:
    """Prompts were ids 3..255 whatever the tokenizer: a real model's control tokens lie there
    (Mistral v0.3's ids 3-770), and a benchmark's prompts were mostly those, where vLLM's random
    dataset draws from the vocabulary less its special ids. One seed, one tokenizer: one set of prompts."""
    special_tok = load_tokenizer(special_tokenizer)
    assert set(SPECIAL_IDS) <= set(special_tok.all_special_ids)
    ids = ordinary_ids(special_tok)
    assert ids == [i for i in range(3, 512) if i not in SPECIAL_IDS]
    specs = build_specs(WorkloadSpec(requests=20), load_traces(WorkloadSpec(requests=20)))
    prompts = [prompt_ids(i, s, ids=ids) for i, s in enumerate(specs)]
    assert not {t for p in prompts for t in p} & set(special_tok.all_special_ids)
    assert [len(p) for p in prompts] == [s.prompt_len for s in specs]
    again = build_specs(WorkloadSpec(requests=20), load_traces(WorkloadSpec(requests=20)))
    assert [prompt_ids(i, s, ids=ordinary_ids(special_tok)) for i, s in enumerate(again)] == prompts


def test_the_prompts_are_drawn_over_the_tokenizers_whole_vocabulary(tok: Any) -> None:
    """Drawn from the first 253 ordinary ids, a 32k or 150k vocabulary's prompts were its first
    ids only (the demo's 3-255 of 512), where vLLM's random dataset draws over the whole vocabulary.
    Mooncake's shared blocks come from the same ids; without a tokenizer the draws stay 3..255."""
    ids = ordinary_ids(tok)
    assert ids == list(range(3, 512))  # the demo's special ids are 0-2
    specs = build_specs(WorkloadSpec(requests=10), load_traces(WorkloadSpec(requests=10)))
    specs.append(RequestSpec(0.0, None, 40, 4, hash_ids=(7, 9), block_tokens=16, prompt_seed=5))  # Mooncake's blocks
    drawn = [t for i, s in enumerate(specs) for t in prompt_ids(i, s, ids=ids)]
    assert max(drawn) > 400 and min(drawn) >= 3 and len(set(drawn)) > 400
    assert max(prompt_ids(len(specs) - 1, specs[-1], ids=ids)[:32]) > 255  # the blocks too
    assert all(3 <= t < 256 for i, s in enumerate(specs) for t in prompt_ids(i, s))


class _ByteFallbackTokenizer:
    """Mistral v0.3's layout: 0-2 <unk> <s> </s>, 3-770 control tokens, 771-1026 its byte-fallback
    tokens <0x00>..<0xFF> (Llama 2's and Mistral v0.1's lie at 3-258), then its word pieces."""

    vocab_size = 32768
    all_special_ids = list(range(771))
    added_tokens_decoder: dict[int, Any] = {}

    @staticmethod
    def convert_ids_to_tokens(ids: list[int]) -> list[str]:
        return [f"<0x{i - 771:02X}>" if 771 <= i < 1027 else f"▁w{i}" for i in ids]


def test_prompts_are_no_byte_fallback_tokens() -> None:
    """A SentencePiece tokenizer's first ids past its special ones are its 256 byte-fallback
    tokens (raw bytes, invalid UTF-8 past 0x7F: chat text of U+FFFD): left out, the rest of its
    vocabulary drawn from."""
    ids = ordinary_ids(_ByteFallbackTokenizer())
    assert ids == list(range(1027, 32768))


def test_making_the_runs_texts_shows_how_far_it_is(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 prompts of 32k tokens took minutes before the first request, printing nothing: a
    bar on a terminal's stderr (vLLM's tqdm), lines in a log."""
    prompts = [[3 + (7 * i + j) % 500 for j in range(16)] for i in range(8)]
    shown = io.StringIO()
    text = made_chat_texts(tok, prompts, 8, Console(file=shown, force_terminal=True, width=100))
    assert "prompts' chat text" in shown.getvalue() and "8/8" in shown.getvalue()
    assert text(0, prompts[0]) == text_of_length(tok, prompts[0])
    monkeypatch.setattr(main, "PROGRESS_EVERY_S", 0.0)  # a line at every prompt made
    logged = io.StringIO()
    made_chat_texts(tok, prompts, 8, Console(file=logged, force_terminal=False, width=100))
    assert logged.getvalue().splitlines() == [f"prompts' chat text: {k} of 8 made" for k in range(1, 9)]
