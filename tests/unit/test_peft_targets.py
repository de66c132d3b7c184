"""peft_targets: the modules, ranks and alphas PEFT itself selects, and a time bound that refuses
hostile configs but not the ones PEFT writes, nor any because other threads ran meanwhile."""

from __future__ import annotations

import random
import time
import types
from collections.abc import Callable
from typing import Any

import pytest

from dlora.model.adapter_config import check_config
from dlora.model.adapter_files import AdapterError
from dlora.model.peft_targets import (
    Targets,
    key_problem,
    key_regex,
    layers_problem,
    layers_regex,
    regex_problem,
    saved_problem,
)
from tests.unit.test_adapter_hostile_configs import counting_compiles

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _modules(layers: int) -> list[str]:
    return [
        f"model.layers.{i}.{'self_attn' if t in TARGETS[:4] else 'mlp'}.{t}" for i in range(layers) for t in TARGETS
    ]


def _an_eva_config_selects_each_module_its_own_rank_and_alpha() -> None:
    """An 80-layer EVA config (a rank and an alpha key per module, each a module's full name)
    selects every module with its own rank and alpha."""
    modules = _modules(80)
    ranks = {m: 4 + i % 13 for i, m in enumerate(modules)}
    alphas = {m: float(i + 1) for i, m in enumerate(modules)}
    conf = {"r": 8, "lora_alpha": 16, "target_modules": list(TARGETS), "rank_pattern": ranks, "alpha_pattern": alphas}
    chosen = Targets("eva", conf)
    for m in modules:
        assert chosen.targeted(m)
        assert chosen.pattern_value(ranks, m, 8) == ranks[m]
        assert chosen.pattern_value(alphas, m, 16) == alphas[m]


def test_an_eva_config_of_an_80_layer_base_is_read_in_full() -> None:
    """PEFT's EVA initialisation writes a rank_pattern and an alpha_pattern key per module (the
    module's full name: peft/tuners/lora/eva.py), each matched, in order, against every module:
    560 x 560 matches twice on an 80-layer base. regex's cache holds 500 patterns, so each match
    compiled its pattern again, and such an adapter was refused at the 2 s bound on an idle
    machine here."""
    _an_eva_config_selects_each_module_its_own_rank_and_alpha()


def test_time_the_matching_thread_spends_waiting_is_not_charged_to_its_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound was wall-clock: the time other threads held the GIL or the cores (the steps,
    other registrations: eight 32-layer EVA configs registered at once were all refused) counted
    as the config's. A thread kept from running, as this one sleeping, spends none of it."""
    monkeypatch.setattr("dlora.model.peft_targets.PATTERN_BUDGET_S", 0.2)
    modules = _modules(2)
    ranks = {".*_proj": 4}
    chosen = Targets("a", {"r": 8, "lora_alpha": 16, "target_modules": ".*_proj", "rank_pattern": ranks})
    for m in modules:
        time.sleep(0.02)
        assert chosen.targeted(m) and chosen.pattern_value(ranks, m, 8) == 4


NAMES = [*TARGETS, "self_attn.q_proj", "mlp.up_proj", "layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj"]
NAMES += ["proj", "q", "", "embed_tokens", "lm_head", "mlp", "1.self_attn.k_proj", ".q_proj", "attn.q_proj"]
REGEXES = [r".*\.(q|v)_proj", r".*layers\.[01]\..*proj", r"model.*", r"(?i).*Q_PROJ", r".*\.\d\.mlp\..*", r"q_proj"]
REGEXES += [
    r"(.*\.)?(q|k)_proj",
    r".*(?<!o)_proj",
    r"lm_head|.*gate_proj",
    r".*\.[2-3]\.[^.]*\.[a-z]_proj",
    r"[[:alpha:]]",
]
REGEXES += [r".*(q_proj){e<=1}", r".*_pro{1,2}j", r"(?i)Q_PROJ"]


def _config(r: random.Random) -> dict[str, Any]:
    conf: dict[str, Any] = {"r": 8, "lora_alpha": 16}
    conf["target_modules"] = r.sample(NAMES, r.randint(1, 5)) if r.random() < 0.5 else r.choice(REGEXES)
    if (x := r.random()) < 0.5:
        conf["exclude_modules"] = r.sample(NAMES, r.randint(1, 3)) if x < 0.3 else r.choice(REGEXES)
    if r.random() < 0.5:
        conf["layers_to_transform"] = r.choice([[], 0, 2, [0], [1, 3], [5]])
        if r.random() < 0.6:
            conf["layers_pattern"] = r.choice(["layers", ["layers"], "lay.rs", ["h", "layers"], r"\w+", "l[[:alpha:]]"])
    if r.random() < 0.5:
        keys = r.sample(NAMES + REGEXES, r.randint(1, 3))
        conf["rank_pattern"] = {k: 4 + i for i, k in enumerate(keys)}
        conf["alpha_pattern"] = {k: float(i + 1) for i, k in enumerate(keys)}
    return conf


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # re's, on '[[' (PEFT's reading)
def test_the_selection_is_peft_s_on_random_configs() -> None:
    """Every config dlora takes selects the modules, ranks and alphas PEFT's own functions do (the
    patterns matched by another engine than PEFT's re, the lists looked up as a set)."""
    peft_tuners = pytest.importorskip("peft.tuners.tuners_utils")
    from peft.utils.other import get_pattern_key

    modules = [*_modules(4), "model.embed_tokens", "lm_head"]
    r, taken = random.Random(0), 0
    for _ in range(400):
        conf = _config(r)
        try:
            check_config("a", conf)
        except AdapterError:
            continue
        taken += 1
        ours = Targets("a", conf)
        # LoraConfig makes sets of these two lists, as PEFT matches them
        lists = {k: set(v) if isinstance(v, list) and k.endswith("_modules") else v for k, v in conf.items()}
        unset = dict.fromkeys(("target_parameters", "modules_to_save", "exclude_modules", "layers_to_transform"))
        peft_conf = types.SimpleNamespace(**{**unset, "layers_pattern": None, **lists})
        for m in modules:
            found = peft_tuners.check_target_module_exists(peft_conf, m)
            theirs = bool(found) and not isinstance(found, peft_tuners._ExcludedModule)
            assert ours.targeted(m) == theirs, (conf, m)
            for key in ("rank_pattern", "alpha_pattern"):
                patterns = conf.get(key) or {}
                assert ours.pattern_value(patterns, m, None) == patterns.get(get_pattern_key(patterns, m)), (conf, m)
    assert taken > 200


def test_a_config_of_many_keys_keeps_few_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pattern is compiled once, but a 1 MB config's 50,000 keys, each kept compiled (~5 KB),
    held over 100 MB of one registration until the bound refused it (regex's own cache holds 500)."""
    monkeypatch.setattr("dlora.model.peft_targets.MAX_COMPILED", 100)
    keys = {f"(k{i})": 8 for i in range(1_000)}  # (a plain name runs no regex engine)
    chosen = Targets("a", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": keys})
    assert chosen.pattern_value(keys, "model.layers.0.self_attn.q_proj", 4) == 4
    assert len(chosen._compiled) == 100


def _no_regex_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the regex engine ran on {args[:1]!r}")

    monkeypatch.setattr("dlora.model.peft_targets.regex.compile", refuse)


def test_an_eva_config_runs_no_regex_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """EVA's keys are module names: matched by the regex engine (which releases the GIL per match),
    four 80-layer EVA configs registered at once came near the 2 s CPU bound each (1.2 s, one alone
    0.7 s). Names whose only metacharacter is '.' are matched without it, first match in order as
    PEFT's get_pattern_key; a string target_modules of that kind too."""
    _no_regex_engine(monkeypatch)
    _an_eva_config_selects_each_module_its_own_rank_and_alpha()
    modules = _modules(80)
    single = Targets("one", {"r": 8, "lora_alpha": 16, "target_modules": "model.layers.1.self_attn.q_proj"})
    assert [m for m in modules if single.targeted(m)] == ["model.layers.1.self_attn.q_proj"]
    exclude = {"r": 8, "lora_alpha": 16, "target_modules": list(TARGETS), "exclude_modules": "lm_head"}
    assert Targets("ex", exclude).targeted(modules[0])


# Keys re reads as literals but for their dots (any character): EVA's names, and near misses where
# a dot stands for another character or the key ends inside a segment.
PLAIN = ["q_proj", "self_attn.q_proj", "q.proj", "layers.1.mlp.down_proj", "layers.1.mlp.down.proj", "", ".", ".."]
PLAIN += ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.k_proj", "1.self_attn.v_proj", "_proj"]
PLAIN += ["lm_head", "lm.head", "embed_tokens", "model.embed_tokens", "self_attn", "layers.2.self.attn.o.proj"]
PLAIN += ["a-b", "mlp.up_proj", "yers.3.mlp.up_proj", "model.layers.3"]


KEY_REGEXES = [k for k in REGEXES if regex_problem(k, key_regex(k)) is None]


def test_plain_keys_select_as_peft_s_first_match_mixed_with_regexes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain keys' matcher agrees with PEFT's get_pattern_key (re) on every module, plain keys
    alone (no regex engine) and mixed in order with regexes (a regex before the first plain match
    still wins)."""
    from peft.utils.other import get_pattern_key

    modules = [*_modules(12), "model.embed_tokens", "lm_head", "model", "x.", "", "model.layers.3"]
    r = random.Random(1)
    for round_ in range(600):
        pool = PLAIN if round_ < 300 else PLAIN + KEY_REGEXES
        keys = r.sample(pool, r.randint(1, 8))
        patterns = {k: i for i, k in enumerate(keys)}
        with monkeypatch.context() as m:
            if round_ < 300:
                _no_regex_engine(m)
            chosen = Targets("a", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
            for module in modules:
                theirs = patterns.get(get_pattern_key(patterns, module))
                assert chosen.pattern_value(patterns, module, None) == theirs, (keys, module)
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    for key in PLAIN:
        conf = {"r": 8, "lora_alpha": 16, "target_modules": key, "exclude_modules": key[::-1]}
        chosen = Targets("a", conf)
        peft_conf = types.SimpleNamespace(**conf, target_parameters=None, modules_to_save=None)
        for module in modules:
            found = check_target_module_exists(peft_conf, module)
            want = bool(found) and not isinstance(found, _ExcludedModule)
            assert chosen.targeted(module) == want, (key, module)


def test_modules_to_save_names_keep_lora_off_as_peft_s_regex_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's check_target_module_exists excludes a module a modules_to_save name matches as a
    regex; Targets agrees on every module, plain names with no regex engine run."""
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    modules = [*_modules(12), "model.layers.3"]
    r = random.Random(2)
    for round_ in range(80):
        pool = PLAIN if round_ < 40 else PLAIN + [k for k in REGEXES if saved_problem(k) is None]
        conf = {"r": 8, "lora_alpha": 16, "target_modules": list(TARGETS), "modules_to_save": r.sample(pool, 3)}
        with monkeypatch.context() as m:
            if round_ < 40:
                _no_regex_engine(m)
            chosen = Targets("a", conf)
            peft_conf = types.SimpleNamespace(**conf, target_parameters=None, exclude_modules=None)
            for module in modules:
                found = check_target_module_exists(peft_conf, module)
                want = bool(found) and not isinstance(found, _ExcludedModule)
                assert chosen.targeted(module) == want, (conf["modules_to_save"], module)


def test_plain_rank_and_alpha_keys_are_checked_without_compiling_a_regex(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_config compiled every rank_pattern / alpha_pattern key with re inside PEFT's
    (.*\\.)?(KEY)$: an EVA-style config of 20,000 module names took 2 s of a core at each
    registration and each load, though a plain key (word characters, '-', '.') always compiles
    there. A key with any other character is still compiled, and refused where re refuses it."""
    compiled = counting_compiles(monkeypatch)
    names = [f"model.layers.{i // 7}.{'self_attn' if i % 7 < 4 else 'mlp'}.{TARGETS[i % 7]}" for i in range(20_000)]
    names[-1] = "model.layers.9.mlp.down-proj.é"  # (-, a dot and a non-ASCII letter: plain too)
    conf = {"r": 8, "lora_alpha": 16, "target_modules": list(TARGETS)}
    check_config("eva", {**conf, "rank_pattern": dict.fromkeys(names, 4), "alpha_pattern": dict.fromkeys(names, 8)})
    assert compiled == []
    with pytest.raises(AdapterError) as refused:
        check_config("eva", {**conf, "rank_pattern": {**dict.fromkeys(names, 4), "(?i)Q_PROJ": 4}})
    assert compiled == [key_regex("(?i)Q_PROJ")]
    assert "rank_pattern key '(?i)Q_PROJ' is not a valid regex" in str(refused.value)


def test_plain_layers_pattern_entries_are_checked_without_compiling_a_regex(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_config compiled every layers_pattern entry inside PEFT's .*\\.{pattern}\\.(\\d+)\\.
    (check_target_module_exists), a plain one ('layers', 'h', 'blocks') too, though such an entry
    always compiles there: a list of 50,000 cost seconds at each registration and load. Only an
    entry with another character is compiled, and refused where re refuses it."""
    compiled = counting_compiles(monkeypatch)
    entries = ["layers", "h", "blocks", "model.layers", "décoder-blocks"] + [f"l{i}" for i in range(50_000)]
    conf = {"r": 8, "lora_alpha": 16, "target_modules": list(TARGETS), "layers_to_transform": [0]}
    check_config("lp", {**conf, "layers_pattern": entries})
    check_config("lp", {**conf, "layers_pattern": "layers"})
    assert compiled == []
    with pytest.raises(AdapterError) as refused:
        check_config("lp", {**conf, "layers_pattern": [*entries[:3], "lay(ers"]})
    assert compiled == [layers_regex("lay(ers")]
    assert "layers_pattern 'lay(ers' is not a valid regex" in str(refused.value)


@pytest.mark.filterwarnings("ignore:Possible:FutureWarning")  # re's, on '[[', '--', '&&'...
@pytest.mark.parametrize(
    ("shortcut", "regex_of", "seed", "group"),
    [(key_problem, key_regex, 3, "(?P<x>"), (layers_problem, layers_regex, 4, "(?P<idx>")],
    ids=["rank_pattern key", "layers_pattern entry"],
)
def test_a_plain_shortcut_refuses_exactly_what_compiling_each_one_refused(
    shortcut: Callable[[str], str | None], regex_of: Callable[[str], str], seed: int, group: str
) -> None:
    """The shortcuts for plain keys and entries refuse exactly what compiling each one refused:
    random ones over word characters, '-', '.', every re metacharacter and escapes."""
    r = random.Random(seed)
    alphabet = list("q_1é.-") + list("()[]{}*+?|^$\\:<>=!#,") + ["(?i)", group, "\\d", "{1,2}", "\n"]
    patterns = ["".join(r.choice(alphabet) for _ in range(r.randint(0, 8))) for _ in range(10_000)]
    for pattern in patterns:
        assert shortcut(pattern) == regex_problem(pattern, regex_of(pattern)), pattern
    assert sum(regex_problem(p, regex_of(p)) is not None for p in patterns) > 2_500  # (the refused half met)
