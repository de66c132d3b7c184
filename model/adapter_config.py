"""``adapter_config.json`` read as PEFT reads it, without torch: JSON bounded by Python's own
limits, PEFT's defaults filled in, and every field checked before any tensor is looked at. A field
that changes the output is either honoured (``adapters`` and ``peft_targets`` read it as PEFT
does) or refused naming it; fields with no effect on inference are let through. Which modules the
config selects, and with what rank and alpha, is ``peft_targets``'; the tensors, ``adapters``'.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dlora.model.adapter_files import AdapterError, nonnegative_int
from dlora.model.peft_targets import (
    MAX_PATTERN_CHARS,
    MAX_REGEX_PATTERNS,
    PATTERN_BUDGET_S,
    key_problem,
    layers_problem,
    plain,
    regex_problem,
    saved_problem,
)

__all__ = ["DEFAULT_TARGETS", "check_config", "read_config"]

# What PEFT adapts when target_modules is left out: its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
# (peft/utils/constants.py) says q_proj and v_proj for llama, mistral and qwen2 alike.
DEFAULT_TARGETS = ["q_proj", "v_proj"]
# CPU seconds (this thread's) that compiling one config's regex patterns with re may take: the
# matcher's bound (peft_targets.PATTERN_BUDGET_S), a deadline of its own, as the compiles come
# first and have no other bound (the matcher's starts when Targets is built)
COMPILE_BUDGET_S = PATTERN_BUDGET_S


def read_config(name: str, path: Path, conf_bytes: bytes) -> dict[str, Any]:
    """adapter_config.json as PEFT reads it (its defaults filled in), or AdapterError."""
    try:
        conf = json.loads(conf_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: {path / 'adapter_config.json'} is not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # valid, but past Python's bounds: 4,300 digits, deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise AdapterError(f"adapter {name!r}: {path / 'adapter_config.json'} cannot be read as JSON ({why})") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"adapter {name!r}: {path / 'adapter_config.json'} is not a JSON object")
    check_config(name, conf)
    if conf.get("target_modules") is None:  # PEFT fills in the model type's defaults
        conf = {**conf, "target_modules": DEFAULT_TARGETS}
    return dict(conf)


def _positive(value: Any) -> bool:
    """A JSON number that is finite, as a float too, and above zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0  # float(10**400) overflows
    except OverflowError:
        return False


# adapter_config.json fields with no effect on inference (metadata, initialisation, training).
_NO_EFFECT = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    "runtime_config",
    "ensure_weight_tying",
    "qalora_group_size",
}
# init_lora_weights values whose initialisation rewrites the base layer's weight (PEFT's
# LoraLayer.update_layer: pissa_init, corda_init, olora_init, mica_init, loftq_init; LoRA-GA in
# older versions). Saved unconverted, such an adapter is trained against that residual base.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")
# Fields read as PEFT reads them (by adapters and peft_targets).
_HONOURED = {
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "modules_to_save",  # (a module of the base named there refused in adapters._modules)
}
# Fields that change the math in ways not served here, by what they are.
_REFUSED = {
    "use_dora": "DoRA adapters are not served",
    "lora_bias": "lora_bias (a bias on lora_B) is not served",
    "layer_replication": "layer_replication is not served",
    "trainable_token_indices": "trainable tokens are not served",
    "target_parameters": "LoRA on parameters (target_parameters) is not served",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not served",
    "use_qalora": "QALoRA is not served",
    "megatron_config": "Megatron-parallel LoRA is not served",
}


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, str) for m in value)


def check_config(name: str, conf: dict[str, Any]) -> None:
    """Raises AdapterError naming the field where ``conf`` (a parsed adapter_config.json) sets one
    that is malformed, one PEFT refuses, a LoRA variant not served, or one not known here to
    something other than its default; returns None where every field is served as PEFT reads it."""

    def refuse(reason: str) -> None:
        raise AdapterError(f"adapter {name!r}: {reason}")

    if conf.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type {conf.get('peft_type')!r} is not LORA")
    # Python's json reads NaN and Infinity, which compare false to everything: test finiteness.
    if not nonnegative_int(conf.get("r")) or conf["r"] == 0:
        refuse(f"adapter_config.json needs a positive integer 'r', not {conf.get('r')!r}")
    if not _positive(conf.get("lora_alpha")):
        refuse(f"adapter_config.json needs a positive finite 'lora_alpha', not {conf.get('lora_alpha')!r}")
    # modules_to_save naming a module the model lacks (a classification template's "score") saves
    # nothing and PEFT wraps nothing: plain LoRA (vLLM refused the field alone: its PR #14978); one
    # the model has is refused in adapters._modules
    if not (conf.get("modules_to_save") is None or _names(conf["modules_to_save"])):
        refuse("modules_to_save must be a list of strings")
    # "all" and "lora_only" train the base layers' biases and save them beside the LoRA weights
    # (refused by their tensors in _modules); a base without biases (Llama) saves none, and PEFT
    # serves such an adapter as plain LoRA (vLLM refusing it by this field alone failed every
    # adapter: its PR #5733's review)
    if conf.get("bias", "none") not in ("none", "all", "lora_only"):
        refuse(f"bias={conf['bias']!r} is not one of PEFT's 'none', 'all' or 'lora_only'")
    for key, reason in _REFUSED.items():
        if conf.get(key):
            refuse(reason)
    if isinstance(init := conf.get("init_lora_weights"), str) and init.lower().startswith(_BASE_CHANGING_INITS):
        refuse(
            f"init_lora_weights {init!r}: this initialisation changes the base model's weights (PEFT changes them "
            "again as it loads the adapter), so the adapter needs a base of its own; convert it to a plain LoRA "
            "first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    unknown = sorted(
        k
        for k, v in conf.items()
        if k not in _NO_EFFECT | _HONOURED | set(_REFUSED) | {"bias"} and v not in (None, False, [], {}, "")
    )
    if unknown:
        refuse(
            f"adapter_config.json sets {', '.join(unknown)}, which dlora does not know and which may change the "
            "output (a LoRA variant); refused rather than served differently from PEFT"
        )

    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        if not (conf.get(key) is None or isinstance(conf[key], str) or _names(conf[key])):
            refuse(f"{key} must be a string or a list of strings")
    layers = conf.get("layers_to_transform")
    indices = layers if isinstance(layers, list) else [layers]
    if not (layers is None or all(nonnegative_int(i) for i in indices)):
        refuse("layers_to_transform must be a layer index or a list of them")
    # peft's LoraConfig refuses these combinations itself
    if layers is not None and isinstance(conf.get("target_modules"), str):
        refuse("layers_to_transform cannot be used when target_modules is a string (peft refuses it too)")
    if conf.get("layers_pattern") and layers is None:
        refuse("layers_pattern needs layers_to_transform (peft refuses it too)")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(conf.get(key) or {}, dict):
            refuse(f"{key} must be an object")
        for pattern, value in (conf.get(key) or {}).items():
            if not _positive(value) or (key == "rank_pattern" and not nonnegative_int(value)):
                refuse(
                    f"{key}[{pattern!r}] must be a positive {'integer' if key == 'rank_pattern' else 'number'} "
                    f"(finite), not {value!r}"
                )
    _check_patterns(name, conf)


def _check_patterns(name: str, conf: dict[str, Any]) -> None:
    """Refuses (AdapterError) a pattern of ``conf`` that PEFT's ``re`` cannot compile where PEFT
    puts it (or whose counted repeats, written out, pass MAX_PATTERN_CHARS: regex_problem), a field
    holding over MAX_REGEX_PATTERNS regex patterns or one over MAX_PATTERN_CHARS characters (no
    compile can be stopped midway), and patterns that take re over
    COMPILE_BUDGET_S of this thread's CPU to compile together (re compiles ~2 us a character; the
    bound is looked at after each compile). Plain module names always compile and are not compiled:
    a 0.74 MB config of 50,000 keys such as '(k1)' cost 1.8 s of a core at every registration and load."""
    deadline = time.thread_time() + COMPILE_BUDGET_S

    def check(
        key: str,
        noun: str,
        patterns: Iterable[str],
        problem_of: Callable[[str], str | None],
        label: str | None = None,
        why: str = "",
    ) -> None:
        """``label`` (``key`` unless given) and ``why`` word the message of a pattern that fails to compile."""
        regexes = list(dict.fromkeys(p for p in patterns if not plain(p)))
        if len(regexes) > MAX_REGEX_PATTERNS:
            raise AdapterError(
                f"adapter {name!r}: {key} has {len(regexes)} regex {noun}s (other than plain module names); "
                f"at most {MAX_REGEX_PATTERNS}"
            )
        if len(longest := max(regexes, key=len, default="")) > MAX_PATTERN_CHARS:
            raise AdapterError(
                f"adapter {name!r}: {key} has a regex {noun} of {len(longest)} characters ({longest[:50]!r}...); "
                f"at most {MAX_PATTERN_CHARS}"
            )
        for pattern in regexes:
            if (problem := problem_of(pattern)) is not None:
                raise AdapterError(
                    f"adapter {name!r}: {label or key} {pattern[:200]!r} is not a valid regex ({problem}{why})"
                )
            if time.thread_time() >= deadline:
                raise AdapterError(
                    f"adapter {name!r}: its regex patterns take over {COMPILE_BUDGET_S:g} s to compile "
                    "(target_modules, exclude_modules, modules_to_save, layers_pattern, rank_pattern, alpha_pattern)"
                )

    def listed(key: str) -> list[str]:
        value = conf.get(key) or []
        return [value] if isinstance(value, str) else list(value)

    for key in ("target_modules", "exclude_modules"):  # a string is a regex; a list, names
        if isinstance(conf.get(key), str):
            check(key, "regex", [conf[key]], regex_problem)
    # PEFT matches each modules_to_save name and layers_pattern entry (a list's too) as a regex
    check(
        "modules_to_save",
        "name",
        listed("modules_to_save"),
        saved_problem,
        label="modules_to_save name",
        why="; PEFT matches each as one",
    )
    check("layers_pattern", "entry", listed("layers_pattern"), layers_problem)
    for key in ("rank_pattern", "alpha_pattern"):
        check(key, "key", conf.get(key) or {}, key_problem, label=f"{key} key")
