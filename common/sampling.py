"""What one request asks of its sampling and stopping (OpenAI / vLLM meanings), and the limits on
it: part of the wire contract, re-exported by ``common.messages``."""

from __future__ import annotations

import math
from typing import NamedTuple

import msgspec

# The list fields vLLM's SamplingParams defaults to None, read as unset (``SamplingParams.__post_init__``,
# and ``dlora generate``'s lines).
NULLABLE = ("stop", "stop_token_ids", "bad_words", "logit_bias", "allowed_token_ids")


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How one request's tokens are chosen and when it stops (OpenAI / vLLM meanings). A field at
    its default is not sent: a worker of an earlier version, which refuses fields it does not know,
    still takes every request that leaves a newer field alone."""

    # Maximum new tokens to generate (counting tokens already produced before a resume). The Python
    # API's None (vLLM's): the context the prompt leaves, filled at add_request; never from the wire.
    max_tokens: int = 16
    # 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    temperature: float = 0.0
    # Keep the smallest set of tokens whose probability sums to at least top_p (1.0 = all; 0 = the
    # most likely one, i.e. greedy).
    top_p: float = 1.0
    # Keep only the k most likely tokens (0 or -1 = all).
    top_k: int = 0
    # Drop the tokens less likely than min_p times the most likely one (vLLM's; 0 = off).
    min_p: float = 0.0
    # Seed for this request's own random generator; None draws from the engine's. -1 is a seed
    # here, where vLLM's SamplingParams and the gateway read it as none (#4531): the gateway sends
    # sample i of n as seed + i, which may come out -1.
    seed: int | None = None
    # Generation stops when one of these strings appears; it is cut from the output text (unless
    # include_stop_str_in_output).
    stop: list[str] = []
    # Generation stops after one of these token ids (it stays in the output tokens).
    stop_token_ids: list[int] = []
    # Stop strings, stop tokens and EOS are not honoured before this many tokens: the stop tokens
    # and EOS are masked from sampling until then (vLLM's extension; 0 = off, at most max_tokens).
    min_tokens: int = 0
    # Keep what ended the request in its text: the stop string, or the stop token's or EOS's text
    # (vLLM's extension; by default neither is in the text, as in vLLM).
    include_stop_str_in_output: bool = False
    # Keep generating past the model's end-of-sequence token (for benchmarks of exact lengths).
    ignore_eos: bool = False
    # Drop special tokens (BOS/EOS) from the output text.
    skip_special_tokens: bool = True
    # OpenAI's penalties on the tokens generated so far: each logit minus frequency_penalty x the
    # token's count and presence_penalty if it occurred at all ([-2, 2]; 0 = off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # CTRL's / transformers' repetition penalty over prompt and output tokens: a seen token's logit
    # is divided by it when positive, multiplied when negative (1 = off; vLLM's meaning).
    repetition_penalty: float = 1.0
    # Report each new token's log-probability and this many most likely alternatives (None: none;
    # 0: the chosen token's only). From the model's own distribution (log-softmax of its logits,
    # before penalties and temperature), as vLLM reports them by default.
    logprobs: int | None = None
    # Report each prompt token's log-probability after the tokens before it, with this many most
    # likely alternatives (vLLM's prompt_logprobs; the completions API's echo with logprobs; None:
    # none). From the model's own distribution; the first token has none. Such a request takes
    # nothing from the prefix cache (a cached block's positions have no logits to give).
    prompt_logprobs: int | None = None
    # Added to the logits of these token ids before sampling, as OpenAI's logit_bias ([-100, 100]
    # each; -100 in effect bans a token, 100 all but forces it). Log-probabilities are reported
    # from the logits before it, as penalties and temperature.
    logit_bias: dict[int, float] = {}
    # Constrain the output to documents of this JSON Schema (JSON text), OpenAI's response_format;
    # the request stops when the document is complete. None: free text.
    json_schema: str | None = None
    # vLLM's other structured outputs (its structured_outputs' regex, choice and grammar): the output
    # must match this regular expression (Rust's regex syntax, as llguidance reads it), be one of
    # these strings, or be a string of this grammar (Lark as llguidance writes it, or GBNF as
    # llama.cpp does). At most one of these and json_schema; the request stops when it is complete.
    regex: str | None = None
    choice: list[str] = []
    grammar: str | None = None
    # Only these token ids may be sampled (vLLM's allowed_token_ids; empty: every one). EOS is not
    # added: a request that may end must list it.
    allowed_token_ids: list[int] = []
    # Words never generated (vLLM's bad_words): each tokenized as vLLM does, alone and after a
    # space; a sequence's last token is masked where the output's last tokens are the others.
    bad_words: list[str] = []
    # The structured output's grammar binds only the tokens after the first occurrence of these ids
    # in the output (a reasoning model's ``</think>`` as its tokenizer encodes it: vLLM applies the
    # grammar once the reasoning has ended); before them no mask, and the grammar's matcher takes
    # none of them. Empty: the grammar binds the output from its first token. A worker older than
    # this field refuses a request that sets it (unknown field), never serving it unconstrained.
    structured_after_token_ids: list[int] = []

    def __post_init__(self) -> None:
        # vLLM's SamplingParams(stop="Human:") is one stop string; taken as the list it is typed,
        # a str was iterated: the request stopped at any of its characters, without a word.
        if isinstance(self.stop, str):
            msgspec.structs.force_setattr(self, "stop", [self.stop])
        # vLLM's defaults these to None, so SamplingParams(stop=None) is a vLLM user's "unset" (as
        # the gateway and dlora generate take a null). Never from the wire: its decoder refuses null.
        for name in NULLABLE:
            if getattr(self, name) is None:
                msgspec.structs.force_setattr(self, name, {} if name == "logit_bias" else [])
        # Each once, in order: an id or a word given twice stops or bans nothing more, and counted
        # twice against MAX_STOPS it refused a request vLLM serves (a client's list joined from the
        # model's and its own; vLLM bounds neither list, and stops on the set of the ids,
        # SamplingParams._all_stop_token_ids)
        for name in ("stop_token_ids", "bad_words"):
            if not isinstance(given := getattr(self, name), list):
                continue  # (a Python caller's int or str: left for ``invalid`` to name)
            try:
                once = list(dict.fromkeys(given))
            except TypeError:  # (a list of lists: likewise)
                continue
            if len(once) < len(given):
                msgspec.structs.force_setattr(self, name, once)

    def outside_vocab(self, vocab: int) -> tuple[str, str] | None:
        """(field, reason) where ``logit_bias``, ``allowed_token_ids`` or ``stop_token_ids`` names a
        token id past a vocabulary of ``vocab`` ids: the first two would index past the logits, a
        stop id there can never be sampled, so the request would run on past what its client asked
        for (vLLM refuses all three alike: vllm-project/vllm #54195); a ``structured_after_token_ids``
        id there never comes, and the grammar would never start."""
        for name, named in (
            ("logit_bias", self.logit_bias),
            ("allowed_token_ids", self.allowed_token_ids),
            ("stop_token_ids", self.stop_token_ids),
            ("structured_after_token_ids", self.structured_after_token_ids),
        ):
            if named and max(named) >= vocab:
                outside = sorted(t for t in named if t >= vocab)
                return name, f"{name} names token ids outside the vocabulary [0, {vocab}): {outside[:8]}"
        return None

    def structured_outputs(self) -> list[str]:
        """The structured-output fields these parameters set (valid ones set at most one)."""
        return [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) not in (None, [])]

    def problem(self) -> str | None:
        """A human-readable reason these parameters are invalid, or None if they are fine."""
        bad = self.invalid()
        return None if bad is None else bad[1]

    def invalid(self) -> tuple[str, str] | None:
        """(field, reason) for the first invalid parameter, or None if they are fine."""
        for name, bounds in RANGES.items():
            if (value := getattr(self, name)) is not None and (why := bounds.problem(name, value)) is not None:
                return name, why
        if not 0 <= self.min_tokens <= self.max_tokens:
            return "min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
        if any(not s for s in self.stop):
            return "stop", "stop strings must not be empty"
        # The text that could begin one is held back and goes into the in-flight record each step.
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            return "stop", f"a stop string holds at most {MAX_STOP_CHARS} characters"
        # Each is looked for after every token: tens of thousands held a worker for seconds a request.
        if len(self.stop) > MAX_STOPS or len(self.stop_token_ids) > MAX_STOPS:
            field = "stop" if len(self.stop) > MAX_STOPS else "stop_token_ids"
            return field, f"{field} holds {len(getattr(self, field))} entries; at most {MAX_STOPS}"
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            return "logit_bias", f"logit_bias holds {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}"
        if any(t < 0 for t in self.logit_bias):
            return "logit_bias", "logit_bias keys must be non-negative token ids"
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):  # NaN fails too
            return "logit_bias", "logit_bias values must be in [-100, 100]"
        if any(t < 0 for t in self.stop_token_ids):
            return "stop_token_ids", "stop_token_ids must be non-negative"
        if len(self.allowed_token_ids) > MAX_ALLOWED_TOKENS or any(t < 0 for t in self.allowed_token_ids):
            return "allowed_token_ids", f"allowed_token_ids must be at most {MAX_ALLOWED_TOKENS} non-negative ids"
        if len(self.bad_words) > MAX_STOPS or any(not w.strip() or len(w) > MAX_STOP_CHARS for w in self.bad_words):
            return "bad_words", f"bad_words must be at most {MAX_STOPS} words of 1 to {MAX_STOP_CHARS} characters"
        after = self.structured_after_token_ids
        if len(after) > MAX_AFTER_TOKENS or any(t < 0 for t in after):
            why = f"structured_after_token_ids must be at most {MAX_AFTER_TOKENS} non-negative ids"
            return "structured_after_token_ids", why
        if len(asked := self.structured_outputs()) > 1:
            return asked[1], f"at most one structured output may be asked for, got {' and '.join(asked)}"
        # No count of choices is capped, as vLLM caps none (300 intents to classify into were a
        # 400): their text is bounded (guidance_grammar.MAX_CONSTRAINT_CHARS), and so is their compile.
        if not all(self.choice):
            return "choice", "choice must hold non-empty strings"
        if self.seed is not None and (why := INT64.problem("seed", self.seed)) is not None:  # as vLLM
            return "seed", why
        return None


# Stop strings (and stop token ids) a request may give: OpenAI takes 4, vLLM any number.
MAX_STOPS = 256
# logit_bias entries a request may give (OpenAI sets 300 in its docs' examples and no hard limit;
# each is an element written into the logits every step).
MAX_LOGIT_BIAS = 1024
# allowed_token_ids entries (a vocabulary's worth: Llama 3 has 128,256 ids; vLLM sets no bound).
MAX_ALLOWED_TOKENS = 1 << 18
MAX_AFTER_TOKENS = 64  # structured_after_token_ids: a closing tag's ids (one, where it is a special token)
MAX_STOP_CHARS = 1024  # one stop string's length (OpenAI and vLLM set none; 1 KB is far past any use)


class Range(NamedTuple):
    """A sampling field's bounds and how a refusal states them: vLLM's sentence
    (``SamplingParams._verify_args``, vllm/sampling_params.py: "top_p must be in (0, 1], got 1.5.").
    NaN is outside every range (each comparison with it is false)."""

    # The least value taken (every field has one).
    low: float
    # The most value taken; ``math.inf``: none.
    high: float = math.inf
    # How the range is said where vLLM says it otherwise than "in [low, high]" / "at least low".
    says: str = ""
    # ``low`` itself is refused: the range is (low, high] ("greater than zero").
    above: bool = False
    # One value taken outside the range, with a meaning of its own (truncate_prompt_tokens' -1:
    # as many as the context holds); None: none.
    also: float | None = None

    def problem(self, name: str, value: float) -> str | None:
        """The reason ``value`` of field ``name`` is refused, or None where it is inside. Infinity
        is refused where no ``high`` bounds it, in vLLM's words ("must be a finite number")."""
        if value == math.inf == self.high:
            return f"{name} must be a finite number, got {value}."
        inside = (self.low < value if self.above else self.low <= value) and value <= self.high
        return None if inside or value == self.also else f"{name} must be {self.span()}, got {value}."

    def span(self) -> str:
        """The range in words: "in [0, 2]", "at least 1", or ``says``."""
        return self.says or (f"at least {self.low:g}" if self.high == math.inf else f"in [{self.low:g}, {self.high:g}]")


# The one table of the numeric sampling fields' ranges: the engine's check (``invalid``), the
# gateway's 400s and ``dlora loadgen``'s options read it, so each surface refuses a value in the
# same words. vLLM's ranges, but where dlora's meaning is wider (top_p 0: greedy, as OpenAI's spec
# takes it; top_k -1: all, which vLLM takes quietly) or a bound guards the engine (noted).
RANGES: dict[str, Range] = {
    "max_tokens": Range(1),
    # OpenAI's bound, and vLLM's engine's too since vllm-project/vllm #44965 (before it: at least 0 only)
    "temperature": Range(0.0, 2.0),
    "top_p": Range(0.0, 1.0),
    "top_k": Range(-1, says="0 (disable), or at least 1"),  # vLLM's words; -1 taken as 0
    "min_p": Range(0.0, 1.0),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    # vLLM's bound and words; a penalty far from 1 saturates the logits it scales where they would
    # overflow float32 (``penalties.repetition``)
    "repetition_penalty": Range(0.0, says="greater than zero", above=True),
    # vLLM's -1 (the whole vocabulary) would overflow the message bus; OpenAI's top_logprobs is 20 at most
    "logprobs": Range(0, 20),
    "prompt_logprobs": Range(0, 20),
}

# A 64-bit signed integer's range: vLLM's bound on seed and priority (its protocol's ge/le), and
# what the wire's integers hold.
INT64 = Range(-(1 << 63), (1 << 63) - 1, says="a 64-bit signed integer")

# The request bodies' own integers (the OpenAI OpenAPI document's createCompletion and
# createChatCompletion ranges, and vLLM's for its fields), in the same words: the gateway's 400s
# and ``dlora loadgen``'s --extra-body read them beside RANGES. Each is an integer.
BODY_RANGES: dict[str, Range] = {
    "n": Range(1, 128),
    "best_of": Range(0, 20),
    "top_logprobs": Range(0, 20),
    "max_completion_tokens": Range(1),
    "seed": INT64,
    "priority": INT64,
    "min_tokens": Range(0),  # and at most max_tokens (``SamplingParams.invalid``)
    # vLLM's: at least 1, or -1; at most the context (``shaping``, which knows it)
    "truncate_prompt_tokens": Range(1, also=-1, says="-1 or at least 1"),
}


def best_of_problem(n: int | None, best_of: int | None) -> str | None:
    """Why a completion's ``best_of`` does not go with its ``n`` (None, either: the default, 1 for
    n), or None: the one rule across the two fields, read by the gateway's 400 and by ``dlora
    loadgen``'s --extra-body (each field inside ``BODY_RANGES`` already). Below ``n`` (0 too,
    inside OpenAI's range) in vLLM's words (``SamplingParams._verify_args`` before V1); above it,
    refused: dlora samples no candidates to rank (vLLM's V1 engine serves no best_of either)."""
    if best_of is None or best_of == (wanted := n or 1):
        return None
    if best_of < wanted:
        return f"best_of must be greater than or equal to n, got n={wanted} and best_of={best_of}."
    return f"best_of other than n is not supported (only its default), got n={wanted} and best_of={best_of}."


# The completions endpoint's own: its logprobs is a count in [0, 5] (a chat's is a flag), and its
# max_tokens may be 0 (its echo alone).
COMPLETION_RANGES: dict[str, Range] = {"logprobs": Range(0, 5), "max_tokens": Range(0)}
