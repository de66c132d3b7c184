r"""Which modules of the base PEFT puts LoRA on, and with what rank and alpha, by the regexes of
an ``adapter_config.json`` (peft/tuners/tuners_utils.py ``check_target_module_exists``,
peft/utils/other.py ``get_pattern_key``): ``target_modules`` and ``exclude_modules`` (a string: a
regex the whole name must match; a list: names or dotted suffixes), ``layers_to_transform`` with
``layers_pattern``, and ``rank_pattern`` / ``alpha_pattern`` keys matched as ``(.*\.)?(KEY)$``,
first match in order; ``modules_to_save`` names keep LoRA off the modules they match as
``(^|.*\.)NAME($|\..*)``.

The config is hostile input (anyone who may write into an adapter root wrote it): Python's ``re``
backtracks for hours on a pattern such as ``(.|.)*X`` against one module name, and a 1 MB config
holds 50,000 pattern keys. The patterns, checked as ``re`` reads them (PEFT's engine), are matched
by ``regex`` (the same syntax; it takes a timeout), every match of one config within one time bound.
Patterns whose one metacharacter is '.' (module names: PEFT's EVA writes a key per module) are
matched without any regex engine, by the same rules (``_Plain``).
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import regex

from dlora.model.adapter_files import AdapterError
from dlora.model.config import TARGET_NAMES

# Every match one config asks for, together, in CPU seconds of the thread matching: a real config's
# few patterns over an 80-layer base's 560 modules take milliseconds, and PEFT's EVA writes a
# rank_pattern and alpha_pattern key per module (560 x 560 matches each: 0.6 s here). A wall-clock
# bound also counted the other threads holding the GIL: eight 32-layer registrations at once were
# all refused.
PATTERN_BUDGET_S = 2.0
# Compiled patterns kept for one config: a key per module of a 290-layer base. A plain key's
# compiled pattern holds ~5 KB (a 1 MB config's 50,000 keys would hold 100 MB or more until its
# bound); one of counted repeats holds what they write out: '(?:a{255}){256}' ~9.5 MB in regex,
# and a config of such keys can hold a GB before the budget stops it (a review: not bounded yet).
MAX_COMPILED = 2048
# Regex patterns (other than plain module names) one field of a config may hold: a key per module
# of a 290-layer base, as MAX_COMPILED. Real configs hold a few, or a key per module: EVA and
# diffusers' conversions write plain names, but PEFT's own LoraConfig docstring writes a
# rank_pattern key as '^model.decoder.layers.0.encoder_attn.k_proj', so a per-module config in
# that style has a regex key per module. re compiles 50,000 keys such as '(k1)' in 1.8 s of a core.
MAX_REGEX_PATTERNS = MAX_COMPILED
# Characters of one regex pattern: neither re nor regex can stop a compile midway, and regex took
# 3 s for one 0.55 MB rank_pattern key (re 1.1 s, at the check), at every registration and load.
# A real config's longest is a target_modules alternation of every module's escaped full name:
# 21 KB for an 80-layer base. At this cap: re 0.13 s, regex 0.32 s of a core. The same cap holds a
# pattern with its counted repeats written out (_unrolled), as regex compiles nested ones.
MAX_PATTERN_CHARS = 65_536


# A pattern re reads as literal characters but for its dots, each any character but a newline
_PLAIN = re.compile(r"[\w.-]*")
# Work between two looks at the time bound in the plain matcher (a few microseconds each)
_CHECK_EVERY = 256


def plain(pattern: str) -> bool:
    """Whether ``pattern`` is a plain module name (letters, digits, '_', '-', '.'): it compiles
    wherever PEFT puts one, and is matched here without a regex engine."""
    return _PLAIN.fullmatch(pattern) is not None


def key_regex(key: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key as PEFT matches it (``get_pattern_key``)."""
    return rf"(.*\.)?({key})$"


def _wrapped_problem(pattern: str, wrap: Callable[[str], str]) -> str | None:
    """Why PEFT's ``re`` cannot compile ``pattern`` as it matches it (``wrap``: its load fails
    there), or None. A plain pattern (``plain``: a module name, as EVA writes one per module)
    always compiles there and is matched here without a regex engine (``_Plain``), so it is not
    compiled: 20,000 rank_pattern keys took re 0.8 s of a core (2 s loaded) at every registration
    and load."""
    return None if plain(pattern) else regex_problem(pattern, wrap(pattern))


def key_problem(key: str) -> str | None:
    """Why PEFT's ``re`` cannot compile a ``rank_pattern`` / ``alpha_pattern`` key as it matches it
    (``re.match(rf"(.*\\.)?({key})$", module)``, ``get_pattern_key``), or None (``_wrapped_problem``)."""
    return _wrapped_problem(key, key_regex)


def saved_regex(name: str) -> str:
    """A ``modules_to_save`` name as PEFT keeps LoRA off the modules it matches
    (``check_target_module_exists``: the name is a regex there, though ``_set_trainable`` wraps the
    modules whose name ends in it literally)."""
    return rf"(^|.*\.){name}($|\..*)"


def saved_problem(name: str) -> str | None:
    """Why PEFT's ``re`` cannot compile a ``modules_to_save`` name as it matches it, or None
    (``_wrapped_problem``)."""
    return _wrapped_problem(name, saved_regex)


def layers_regex(pattern: str) -> str:
    """A ``layers_pattern`` as PEFT matches it (``check_target_module_exists``)."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def layers_problem(pattern: str) -> str | None:
    """Why PEFT's ``re`` cannot compile a ``layers_pattern`` entry as it matches it
    (``re.match(rf".*\\.{pattern}\\.(\\d+)\\.", module)``, ``check_target_module_exists``), or None
    (``_wrapped_problem``)."""
    return _wrapped_problem(pattern, layers_regex)


# A repeat as re reads one; any other '{' is a literal to re, but regex reads fuzzy matching there
_REPEAT = re.compile(r"\{\d*(?:,\d*)?\}")


def _read_otherwise(pattern: str) -> str | None:
    """Syntax that ``regex`` reads otherwise than ``re`` (which compiles it without a word): a
    '[' inside a set (regex: a POSIX class such as [[:digit:]] or a nested set; re: the characters
    '[', ':', 'd'...) and a '{' that is no repeat (regex: fuzzy matching such as (q_proj){e<=1},
    which selects k_proj too; re: a literal '{', which no module name holds)."""
    i, in_set = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i = pattern.find("}", i) + 1 if pattern.startswith("N{", i + 1) else i + 2  # \N{NAME}: one character
            if i == 0:
                return None  # an unclosed \N{: re refused it already
            continue
        if in_set:
            if c == "[":
                return (
                    "a '[' inside [...] (a POSIX class or nested set to the matcher, literal characters to PEFT's re)"
                )
            in_set = c != "]"
        elif c == "[":
            in_set = True
            i += 1 + pattern.startswith("^", i + 1)
            i += pattern.startswith("]", i)  # a ']' first in a set is one of its characters
            continue
        elif c == "{" and not _REPEAT.match(pattern, i):
            return "a '{' that is no repeat (fuzzy matching to the matcher, a literal '{' to PEFT's re)"
        i += 1
    return None


def regex_problem(pattern: str, whole: str | None = None) -> str | None:
    """Why ``re`` (PEFT's engine) cannot compile ``pattern`` as PEFT uses it (``whole``, which
    holds it: '(?i)x' compiles alone, not inside a rank_pattern key's group), or why its matches here
    would differ from PEFT's; None when neither."""
    if (otherwise := _read_otherwise(pattern)) is not None:  # (first: re warns of a nested set)
        return otherwise
    try:
        re.compile(pattern if whole is None else whole)
        unrolled = _unrolled(_PARSER.parse(pattern if whole is None else whole))
    except RecursionError:  # a few thousand nested groups: not a re.error
        return "nested too deeply"
    except (re.error, OverflowError) as e:
        return str(e)
    if unrolled > MAX_PATTERN_CHARS:
        return (
            f"its counted repeats, written out, come to over {MAX_PATTERN_CHARS} characters "
            "(the matcher's regex engine writes nested ones out when it compiles them)"
        )
    return None


# re's parser (PEFT's engine reads a pattern with it; typeshed has no stub under this name, and the
# sre_parse alias warns that it is deprecated)
_PARSER: Any = importlib.import_module("re._parser")
_CONSTANTS: Any = importlib.import_module("re._constants")
_REPEATS = {_CONSTANTS.MAX_REPEAT, _CONSTANTS.MIN_REPEAT, _CONSTANTS.POSSESSIVE_REPEAT}


def _subpatterns(av: Any) -> Iterator[Any]:
    """The subpatterns in a parsed node's argument (a group's, a branch's, a lookaround's)."""
    if isinstance(av, _PARSER.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for item in av:
            yield from _subpatterns(item)


def _unrolled(parsed: Any) -> int:
    """Characters' worth of a parsed pattern with each counted repeat written out (``{m,n}`` as n
    copies, ``{m,}`` as m), up to MAX_PATTERN_CHARS + 1. ``regex`` compiles nested counted repeats
    written out, unlike re: '(?:(?:a{100}){100}){100}' took it 0.4 s of a core and
    '(?:(?:a{1000}){1000}){1000}' (31 characters, which re compiles in a millisecond) more memory
    than the machine had, at the first match of a config holding it."""
    total = 0
    for op, av in parsed:
        if op in _REPEATS:
            low, high, sub = av
            size = _unrolled(sub) * (max(low, 1) if high == _CONSTANTS.MAXREPEAT else high)
        else:
            size = max(1, sum(_unrolled(s) for s in _subpatterns(av)))
        total = min(total + size, MAX_PATTERN_CHARS + 1)
    return total


def _masked(text: str, dots: tuple[int, ...]) -> str:
    """``text`` with a '.' at each of ``dots``: what a plain pattern with dots there matches it as."""
    if not dots:
        return text
    chars = list(text)
    for i in dots:
        chars[i] = "."
    return "".join(chars)


def _dots(key: str) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(key) if c == ".")


class _Plain:
    r"""The plain keys of a ``rank_pattern`` / ``alpha_pattern``, found as re finds
    ``(.*\.)?(KEY)$``: the module name ends in a string of the key's length, at its start or after
    a dot, equal to the key at each of its characters but its dots. Keys are indexed by length,
    then by where their dots are (a real config's few layouts), so a name costs a lookup per
    suffix it has, not a match per key: EVA's 560 keys matched against 560 modules by the regex
    engine took 0.7 s of a 2 s bound alone, and it releases the GIL per match, so four at once
    charged each other's waits (1.2 s each)."""

    def __init__(self, keys: list[tuple[int, str]]) -> None:
        # length -> dot positions -> key -> its place in the config (the first kept: PEFT's first match)
        self.by_length: dict[int, dict[tuple[int, ...], dict[str, int]]] = {}
        for place, key in keys:
            self.by_length.setdefault(len(key), {}).setdefault(_dots(key), {}).setdefault(key, place)

    def first(self, module: str, spend: Callable[[int], None]) -> int | None:
        """The place of the first key matching ``module`` (which holds no newline), or None.
        ``spend`` is told the work done, to hold it to the config's time bound."""
        n, best = len(module), None
        for length in [n, *(n - i - 1 for i in _dots(module))]:  # the suffixes at the start or a dot
            layouts = self.by_length.get(length, {})
            spend(len(layouts))
            tail = module[n - length :]
            for dots, keys in layouts.items():
                place = keys.get(_masked(tail, dots))
                if place is not None and (best is None or place < best):
                    best = place
        return best


class Targets:
    """PEFT's reading of one config's module selection, its matches bounded together in time."""

    def __init__(self, name: str, conf: dict[str, Any]) -> None:
        self.name, self.conf = name, conf
        self._budget = PATTERN_BUDGET_S
        # A list's names as a set, looked up by a module's few dotted suffixes: compared one by one,
        # a 1 MB config's 100,000 names cost an 80-layer base 13 s at every registration and load.
        self._names = {k: set(v) for k in ("target_modules", "exclude_modules") if isinstance(v := conf.get(k), list)}
        # Each pattern compiled once: regex's cache holds 500, so an EVA config's 560 keys, matched
        # in turn against each module, were compiled again at every match (4x the time).
        self._compiled: dict[str, regex.Pattern[str]] = {}
        self._deadline = time.thread_time() + self._budget
        # Each pattern dict's plain keys indexed and its other keys in order, by the dict's id
        # (the dict kept, so the id is not reused)
        self._split: dict[int, tuple[dict[str, Any], _Plain, list[str], list[tuple[int, str]]]] = {}
        self._work = 0
        # modules_to_save names, plain ones indexed as rank_pattern keys are (a 1 MB config's 50,000
        # names matched one by one against each module would cost seconds)
        saved = conf.get("modules_to_save") or []
        self._saved_plain = _Plain([(i, k) for i, k in enumerate(saved) if plain(k)])
        self._saved_others = [k for k in saved if not plain(k)]

    def _refuse_slow(self) -> AdapterError:
        return AdapterError(
            f"adapter {self.name!r}: its module patterns take over {self._budget:g} s to match "
            "(target_modules, exclude_modules, layers_pattern, rank_pattern, alpha_pattern)"
        )

    def _spend(self, work: int) -> None:
        self._work += work
        if self._work >= _CHECK_EVERY:
            self._work = 0
            if time.thread_time() > self._deadline:
                raise self._refuse_slow()

    def _match(self, how: str, pattern: str, text: str) -> regex.Match[str] | None:
        left = self._deadline - time.thread_time()
        try:
            if left <= 0:
                raise TimeoutError
            if (compiled := self._compiled.get(pattern)) is None:
                compiled = regex.compile(pattern)
                if len(self._compiled) < MAX_COMPILED:
                    self._compiled[pattern] = compiled
            match: regex.Match[str] | None = getattr(compiled, how)(text, timeout=left)
        except TimeoutError:
            raise self._refuse_slow() from None
        except (regex.error, RecursionError, OverflowError) as e:  # (re took it: not expected)
            raise AdapterError(f"adapter {self.name!r}: a module pattern cannot be matched ({e})") from None
        return match

    def pattern_value(self, patterns: dict[str, Any], module: str, default: Any) -> Any:
        """PEFT's ``get_pattern_key``: the first key (in order) whose regex, grouped, ends the
        module name at a dot or the start."""
        if not patterns:  # (a fresh {} at each call where the config has none: not kept)
            return default
        if "\n" in module:  # re's '$' matches before a final newline, and its '.' no newline
            return next((v for k, v in patterns.items() if self._match("match", key_regex(k), module)), default)
        if (split := self._split.get(id(patterns))) is None:
            keys = list(patterns)
            plains = [(i, k) for i, k in enumerate(keys) if plain(k)]
            others = [(i, k) for i, k in enumerate(keys) if not plain(k)]
            split = self._split[id(patterns)] = (patterns, _Plain(plains), keys, others)
        _, plain_keys, keys, others = split
        first = plain_keys.first(module, self._spend)
        for place, key in others:  # a pattern before the first plain key that matches still wins
            if first is not None and place > first:
                break
            if self._match("match", key_regex(key), module):
                return patterns[key]
        return default if first is None else patterns[keys[first]]

    def _in_modules(self, key: str, module: str) -> bool:
        """A ``target_modules`` / ``exclude_modules`` value: a string is a regex the whole name must
        match; a list names modules by full name or dotted suffix."""
        if isinstance(spec := self.conf[key], str):
            if plain(spec) and "\n" not in module:
                return len(spec) == len(module) and _masked(module, _dots(spec)) == spec
            return self._match("fullmatch", spec, module) is not None
        parts, names = module.split("."), self._names[key]
        return any(".".join(parts[i:]) in names for i in range(len(parts)))

    def _saved(self, module: str) -> bool:
        """Whether a ``modules_to_save`` name matches ``module`` as PEFT's ``saved_regex``: a plain
        name ends a part of it that starts at its start or a dot and ends at its end or a dot."""
        ends = [len(module), *_dots(module)] if "\n" not in module else []  # (re's '.' is no newline)
        if any(self._saved_plain.first(module[:end], self._spend) is not None for end in ends):
            return True
        others = self._saved_others if ends else self.conf["modules_to_save"]
        return any(self._match("match", saved_regex(name), module) for name in others)

    def _layer_index(self, module: str) -> int | None:
        patterns = self.conf.get("layers_pattern") or None
        if patterns is None:  # the first numbered segment after a named one
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
            return int(m["idx"]) if m else None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            if found := self._match("match", layers_regex(p), module):
                return int(found["idx"])
        return None

    def targeted(self, module: str) -> bool:
        """Whether PEFT puts LoRA on ``module`` (a base-model module name such as
        ``model.layers.0.self_attn.q_proj``) under this config."""
        conf = self.conf
        if conf.get("exclude_modules") and self._in_modules("exclude_modules", module):
            return False
        if conf.get("modules_to_save") and self._saved(module):
            return False
        spec = conf.get("target_modules")
        if spec is None:
            return False
        if isinstance(spec, str) and spec.lower() == "all-linear":  # every linear layer but the output
            # head: all of TARGET_NAMES here (PEFT reads the shorthand in any case)
            return module.rsplit(".", 1)[-1] in TARGET_NAMES
        if isinstance(spec, str):
            return self._in_modules("target_modules", module)
        if module in self._names["target_modules"]:  # named in full: PEFT applies no layer filter to it
            return True
        if not self._in_modules("target_modules", module):
            return False
        layers = conf.get("layers_to_transform")
        if layers is None or layers == []:
            return True
        index = self._layer_index(module)
        return index is not None and (index == layers if isinstance(layers, int) else index in layers)
