"""A chat's reasoning (``<think>...</think>``) read apart from its answer, as vLLM's
``--reasoning-parser`` does (the gateway's ``reasoning_parser``). Pure. One reading serves a whole
output and a stream (``feed`` its pieces, then ``finish``), so the two answer alike: the
reasoning goes out as vLLM's ``reasoning`` field, what follows ``</think>`` as ``content`` (and is
what a tool-call parser reads: a call written while thinking is reasoning text).

- ``deepseek_r1`` (DeepSeek R1 and its distills): R1's later templates open ``<think>`` in the
  prompt, so the output may hold only ``</think>``: everything before it is reasoning. An output
  that begins with ``<think>`` (after whitespace) has it taken off. No ``</think>``: all of it is
  reasoning (cut short while thinking), no content.
- ``qwen3`` (Qwen3, QwQ, Qwen3.5): the same reading of the tags (vLLM's current one: a Qwen3.5
  template opens ``<think>`` in the prompt as R1's does), but ``chat_template_kwargs``'
  ``enable_thinking: false`` makes the whole output content: the template closed the think block
  in the prompt itself (vLLM routes such a stream as content, ``prompt_is_reasoning_end``).
- ``deepseek_v3`` (DeepSeek V3.1 and later hybrids, whose templates think only when asked): the
  tags read as ``deepseek_r1`` reads them where ``chat_template_kwargs`` say ``thinking`` or
  ``enable_thinking`` (as vLLM's, truthy; a ``reasoning_effort`` other than "none" sets the
  latter), else the whole output is content, its ``reasoning`` null (vLLM's identity reading).

- ``granite`` (Granite 3.2/3.3 told ``thinking``): no tags but plain-text markers, an output that
  begins (after whitespace) with "Here is my thought process:" (or "Here's ...", vLLM's) is
  reasoning up to "Here is my response:" (or "Here's ..."), what follows it content; one that does
  not begin so is all content, its ``reasoning`` null; one cut before its response marker is all
  reasoning (vLLM's stream reads it so; its whole reading gives it as content). The markers are
  text of several tokens whatever the tokenizer: a structured output beside it binds from the
  first token (no reasoning read), and usage says no reasoning_tokens (vLLM counts none either).

A ``<think>`` later in the reasoning is taken off, the text before it kept as reasoning, as vLLM's
stream reads it (its tag token skipped); vLLM's whole-output reading drops that text too: dlora
answers both as vLLM's stream does (the tag was left in the reasoning text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dlora.services.gateway.tool_base import partial_tag

PARSERS = ("deepseek_r1", "qwen3", "deepseek_v3", "granite")
# Parsers whose reasoning is marked by plain text, not tags a grammar or a token count can wait for
MARKED = frozenset({"granite"})
_THOUGHT = ("Here is my thought process:", "Here's my thought process:")
_RESPONSE = ("Here is my response:", "Here's my response:")
_OPEN, _CLOSE = "<think>", "</think>"
REASONING_START, REASONING_END = _OPEN, _CLOSE  # a structured output's grammar binds what follows the end


def tag_problem(kind: str, end_ids: list[int]) -> str | None:
    """Why a structured output beside parser ``kind`` may go unbound, or None: the tokenizer writes
    ``</think>`` (``end_ids``, as it encodes it) in several tokens, and a model that writes the tag
    in other pieces (a SentencePiece "▁</", say) never completes that sequence, so its grammar never
    starts. vLLM refuses to start such a parser (its end token must be one token); dlora serves it
    and says so at start: the text parser still splits on the tag."""
    if not kind or kind in MARKED or len(end_ids) == 1:
        return None
    return (
        f"reasoning_parser {kind}: the tokenizer writes {_CLOSE} as {len(end_ids)} tokens {end_ids}, not one; "
        "a structured output binds only once the model writes it in exactly those"
    )


def thinking(kind: str, chat_template_kwargs: dict[str, object] | None) -> bool:
    """Whether a chat's output is read for reasoning: not a qwen3 chat whose template was told
    ``enable_thinking: false`` (its think block is closed in the prompt), nor a deepseek_v3 chat
    whose template was not told to think (vLLM's ``bool()`` of either key)."""
    kwargs = chat_template_kwargs or {}
    if kind == "deepseek_v3":
        return bool(kwargs.get("thinking")) or bool(kwargs.get("enable_thinking"))
    return not (kind == "qwen3" and kwargs.get("enable_thinking", True) is False)


def closes_reasoning(prompt: str, continued: bool) -> bool:
    """Whether a chat's prompt ended the reasoning already, its output content (vLLM reads the
    prompt's ids alike, ``is_reasoning_end``): a template whose generation prompt closes the think
    block (DeepSeek V3.1's ``thinking: false``, GLM-4.5's ``enable_thinking: false``) ends with
    ``</think>``; a message the model continues (``continued``) closed it where its last tag is
    ``</think>``. A closed block of an earlier turn is not this one's: a new turn opens after it.
    A structured output's grammar then binds from the first token, as the ``</think>`` it would
    wait for never comes."""
    if continued:
        return prompt.rfind(_CLOSE) > prompt.rfind(_OPEN)
    return prompt.rstrip().endswith(_CLOSE)


@dataclass
class ReasoningParser:
    """Reads one choice's output (``feed`` each piece as it comes, then ``finish``): each returns
    the (reasoning, content) text to send now."""

    kind: str  # "": none, the text all content
    thinking: bool = True  # false: the whole output is content (``thinking``)
    _state: str = "start"  # start: a <think> may yet open the output; reasoning; content
    _held: str = ""  # text not given out yet: a possible start of a tag (a few characters)
    # Whitespace that may precede an opening <think>, kept apart from _held, which each feed scans:
    # in it, an output of nothing but whitespace was scanned whole at every token (quadratic).
    _space: list[str] = field(default_factory=list)
    reasoned: bool = False  # granite: the output began with its thought marker (else its reasoning is null)

    def feed(self, text: str) -> tuple[str, str]:
        if not self.kind or not self.thinking or self._state == "content":  # ("": no parser)
            return "", text
        if self.kind in MARKED:
            return self._marked(text)
        if self._state == "start":
            if not self._held:  # (after a part of "<think>", whitespace is no more before it)
                start = text.lstrip()
                self._space.append(text[: len(text) - len(start)])
                text = start
            self._held += text
            if _OPEN.startswith(self._held) and self._held != _OPEN:
                return "", ""  # whitespace, or a part of "<think>": which is it?
            space, self._space = "".join(self._space), []
            self._held = self._held[len(_OPEN) :] if self._held.startswith(_OPEN) else space + self._held
            self._state = "reasoning"
        else:
            self._held += text
        end = self._held.find(_CLOSE)
        if end >= 0:
            reasoning, content = self._held[:end].replace(_OPEN, ""), self._held[end + len(_CLOSE) :]
            self._held, self._state = "", "content"
            return reasoning, content
        keep = max(partial_tag(self._held, _CLOSE), partial_tag(self._held, _OPEN))
        reasoning, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return reasoning.replace(_OPEN, ""), ""

    def _marked(self, text: str) -> tuple[str, str]:
        """``feed`` for granite: its markers are text (``_THOUGHT``, ``_RESPONSE``)."""
        if self._state == "start":
            if not self._held:  # (whitespace kept apart, as feed's, not scanned again per token)
                start = text.lstrip()
                self._space.append(text[: len(text) - len(start)])
                text = start
            self._held += text
            if any(m.startswith(self._held) and m != self._held for m in _THOUGHT):
                return "", ""  # whitespace, or a part of the marker: which is it?
            opened = next((m for m in _THOUGHT if self._held.startswith(m)), None)
            if opened is None:  # no marker: the whole output is content
                content, self._held, self._state, self._space = "".join(self._space) + self._held, "", "content", []
                return "", content
            self._held, self._state, self.reasoned, self._space = self._held[len(opened) :], "reasoning", True, []
        else:
            self._held += text
        found = [(at, m) for m in _RESPONSE if (at := self._held.find(m)) >= 0]
        if found:
            at, marker = min(found)
            reasoning, content = self._held[:at], self._held[at + len(marker) :]
            self._held, self._state = "", "content"
            return reasoning, content
        keep = max(partial_tag(self._held, m) for m in _RESPONSE)
        reasoning, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return reasoning, ""

    def finish(self) -> tuple[str, str]:
        """The end of the output: text held back is reasoning (a think block not closed); granite's
        before its marker came whole is content (the output did not begin with it)."""
        if self.kind in MARKED and self._state == "start":
            content, self._held, self._state = "".join(self._space) + self._held, "", "content"
            self._space = []
            return "", content
        reasoning, content = self.feed("")
        rest, self._held, self._space = "".join(self._space) + self._held, "", []
        return reasoning + rest, content

    def piece(self, text: str, last: bool) -> tuple[str, str]:
        """``feed``, and ``finish`` too where ``text`` is the output's last piece."""
        reasoning, content = self.feed(text)
        if not last:
            return reasoning, content
        more, rest = self.finish()
        return reasoning + more, content + rest

    @property
    def ended(self) -> bool:
        """Whether the reasoning is over (``</think>`` read, or none to read)."""
        return not self.thinking or self._state == "content"


@dataclass
class ReasoningTokens:
    """How many of one choice's output tokens are its reasoning (OpenAI's usage
    ``completion_tokens_details.reasoning_tokens``): the tokens of the text ``ReasoningParser``
    answers as reasoning, up to the first ``</think>`` (``close_ids``; none yet: the last token),
    no tag counted: past a ``<think>`` (``open_ids``) that opens the output, whitespace before it
    not counted; else from the first token (R1's later templates open it in the prompt), a
    ``<think>`` later in the reasoning taken off as its text is. 0 where the output is not read
    for reasoning (``thinking`` false). ``feed`` each chunk's ids (and text) as they come: a tag
    split across chunks is found, no chunk is scanned twice, and a count never goes down.
    vLLM's think-tag parsers count only inside a ``<think>`` the output writes (a depth count):
    0 for an R1 template's output, whose reasoning dlora counts."""

    open_ids: list[int]
    close_ids: list[int]
    thinking: bool = True
    _seen: int = 0  # tokens fed
    _start: int = 0  # where the reasoning starts: past a <think> that opened the output
    _end: int | None = None  # where </think> starts, once found
    _inner: int = 0  # the ids of <think> tags later in the reasoning (taken off its text): not counted
    _tail: list[int] = field(default_factory=list)  # the last ids, that may begin a tag
    _held: int = 0  # the last ids that may begin a tag: not counted yet (so a count never goes down)
    _lead: str | None = ""  # the text so far, whitespace stripped, while a <think> may open it; None: it did not
    # Where the first <think> is among the ids fed while ``_lead`` is undecided: a stop string holds
    # the text back (its length less one) while the ids go out, so when the text says the tag opened
    # the output it can be past the last ids (the whitespace before it was counted then)
    _lead_open: int | None = None

    def feed(self, ids: Sequence[int], text: str = "") -> None:
        seen, self._seen = self._seen, self._seen + len(ids)
        if not self.thinking:
            return
        base, window = seen - len(self._tail), [*self._tail, *ids]
        opener, closer = self.open_ids, self.close_ids
        if self._lead is not None:
            if self._lead_open is None and self._end is None and (at := _find(window, opener)) >= 0:
                self._lead_open = base + at
            lead = self._lead + text if self._lead else text.lstrip()
            self._lead = lead if _OPEN.startswith(lead) and lead != _OPEN else None
            if lead.startswith(_OPEN) and self._lead_open is not None:
                self._start = self._lead_open + len(opener)
                if self._start <= seen:  # it ended in ids fed before: counted as a later tag then
                    self._inner -= len(opener)
        if self._end is not None:  # (after </think>: nothing more to find)
            return
        if (at := _find(window, closer)) >= 0:
            self._end = base + at
        for at in _every(window, opener):  # later tags, each once: where it ends in these ids
            after = base + at + len(opener)  # (where it ends)
            if seen < after and self._start <= base + at and (self._end is None or after <= self._end):
                self._inner += len(opener)
        self._tail = window[max(0, len(window) - max(len(opener), len(closer)) + 1) :]
        self._held = max(_partial_ids(self._tail, closer), _partial_ids(self._tail, opener))

    def count(self, done: bool = False) -> int:
        """So far; ``done``: the output is over, a part of a tag that ended it is reasoning."""
        if not self.thinking:
            return 0
        if self._lead is not None and not done:  # no text yet but whitespace or a part of <think>: not known
            return 0
        end = self._end if self._end is not None else self._seen - (0 if done else self._held)
        return max(0, end - self._start - self._inner)


def _find(ids: list[int], tag: list[int]) -> int:
    """Where ``tag`` (non-empty) first occurs in ``ids``, or -1."""
    n = len(tag)
    return next((i for i in range(len(ids) - n + 1) if ids[i : i + n] == tag), -1) if n else -1


def _every(ids: list[int], tag: list[int]) -> list[int]:
    """Where ``tag`` (non-empty) occurs in ``ids``, the occurrences apart."""
    found, i, n = [], 0, len(tag)
    while n and i <= len(ids) - n:
        if ids[i : i + n] == tag:
            found.append(i)
            i += n
        else:
            i += 1
    return found


def _partial_ids(ids: list[int], tag: list[int]) -> int:
    """How many ids at the end of ``ids`` could begin ``tag``."""
    return next((n for n in range(min(len(tag) - 1, len(ids)), 0, -1) if ids[-n:] == tag[:n]), 0)


def split(kind: str, text: str, thinking: bool = True) -> tuple[str | None, str | None]:
    """A whole output as vLLM's message gives it: (reasoning, content), each None where there is
    none (reasoning: not read; content: empty). No ``kind`` (no parser): the text as it is."""
    if not kind:
        return None, text
    parser = ReasoningParser(kind, thinking)
    reasoning, content = parser.feed(text)
    rest, more = parser.finish()
    read = thinking and (parser.reasoned or kind not in MARKED)
    return (reasoning + rest if read else None), (content + more) or None
