r"""PEFT LoRA adapters read and validated against the base model without torch: the tensors' shapes
come from the safetensors header and their values are checked with numpy, so the gateway checks
an adapter without torch, and the engine loads exactly what this module accepted. How the files are
read, and the limits on sizes, ranks, dtypes and values, are ``adapter_files``'; how its
``adapter_config.json`` is read and which fields are refused, ``adapter_config``'.

Only safetensors are read. Every ``adapter_config.json`` field that changes the output is read as
PEFT reads it (peft/tuners/tuners_utils.py ``check_target_module_exists``, peft/utils/other.py
``get_pattern_key``), or the adapter is refused with the field named:
- scaling ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with ``rank_pattern`` /
  ``alpha_pattern`` keys matched as ``(.*\.)?(KEY)$`` on the module name, first match in order
  (``peft_targets``: the patterns are hostile input, matched within a time bound);
- which modules carry LoRA: ``target_modules`` (a list: the name or a dotted suffix, a name in
  full kept whatever ``layers_to_transform`` says; a string: a regex the whole name must match;
  ``all-linear`` in any case; left out: PEFT's default for these models, q_proj and v_proj),
  ``exclude_modules`` (the same two forms), ``layers_to_transform`` with ``layers_pattern``.
  Weights in the file for projections PEFT would not adapt are ignored, as PEFT ignores them
  (under any adapter name, in any number of copies), and so are the weights of a top-level
  module the base lacks (a classification head's ``score.weight``, or its own ``score.lora_A``);
  LoRA tensors of another part of a model (a vision tower's layers), on the embeddings or the
  output head, and for a selected projection under a name PEFT does not load (another adapter's
  name, the wrong block) or two for one weight, are refused; so are a whole weight of a module the
  base has (``model.norm.weight``: PEFT loads it over the base's) and a selected module without
  weights under ``init_lora_weights: false`` (PEFT leaves it random; otherwise its delta is zero,
  as PEFT's);
- ``fan_in_fan_out`` is dropped for Linear layers, as PEFT drops it (with a warning) for them;
- ``bias`` ``all`` / ``lora_only`` is served where the file holds no bias (a base without biases
  saves none: plain LoRA, as PEFT loads it), and ``modules_to_save`` where it names no module of
  the base that holds weights (PEFT wraps none, or one with nothing to load: ``rotary_emb``; as
  PEFT, no LoRA goes on a module one of its names matches as a regex); a bias tensor, a module of
  the base fine-tuned whole, or a LoRA layer's own part (PEFT's load fails), is refused;
- DoRA, ``lora_bias``, layer replication, trainable tokens,
  parameter targets, aLoRA, QALoRA, Megatron and the other LoRA variants are refused, and so is any
  field this module does not know that is set to something other than a default.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlora.model.adapter_config import read_config
from dlora.model.adapter_files import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterLimits,
    AdapterOverLimit,
    AdapterRefused,
    TensorInfo,
    read_adapter_files,
    safetensors_header,
    value_problem,
)
from dlora.model.config import TARGET_NAMES, ModelConfig, targets
from dlora.model.peft_targets import Targets

__all__ = [
    "AdapterError",
    "AdapterLimits",
    "AdapterOverLimit",
    "AdapterRefused",
    "AdapterSpec",
    "ModuleSpec",
    "content_digest",
    "inspect_adapter",
    "parse_lora_args",
    "read_adapter_files",
    "validate",
]

# A LoRA weight of the language model's layers, named as PEFT saves it for a causal LM
# (base_model.model.model.layers...) or as the base names the module (transformers' load_adapter
# reads those); any other prefix is another part's (a vision tower's), which PEFT does not load
# into this model. Groups: layer, parent, target, A or B, the adapter name a key may carry. The
# layer's digits are bounded: int() of 5,000 of them raised ValueError past every handler (a 500).
_KEY = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d{1,9})\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.([\w-]+))?\.weight"
)
# The adapter name a key may carry: PEFT's default, which PeftModel.from_pretrained loads under; a
# key of another name, PEFT leaves unloaded (its lora_B stays zero: the base model's output).
_KEY_NAMES = (None, "default")
# The model's modules outside its layers' projections that a config may select (no LoRA served on them).
_OTHER_MODULES = ("model.embed_tokens", "lm_head")
# The first part of a key naming a module of the causal LM (PEFT's keys under base_model.model.,
# transformers' load_adapter's bare: layers.N..., embed_tokens, norm)
_BASE_TOP = ("model", "lm_head", "layers", "embed_tokens", "norm", "rotary_emb")
# A LoRA weight on a top-level module itself (a classification head: score.lora_A.weight), under
# any adapter name; a deeper one (vision_tower.layers.0...) is another part's
_HEAD_LORA = re.compile(r"(?:base_model\.model\.)?\w+\.lora_[AB](?:\.[\w-]+)?\.weight")


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted projection: its tensors in the file, rank and scaling."""

    a_key: str  # lora_A, (rank, in_features)
    b_key: str  # lora_B, (out_features, rank)
    rank: int
    scale: float


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as checked against the base model and the limits, its values included."""

    name: str
    path: Path
    # (layer index, PEFT target name such as "q_proj") -> what is adapted there
    modules: dict[tuple[int, str], ModuleSpec]
    # What this adapter is, whatever its name: a digest of adapter_config.json and the weights
    # file (``content_digest``). A name registered again with other files is another version.
    digest: str
    # Bytes of adapter_config.json and the weights file: what reading it reads (a worker's read
    # takes seconds in proportion to them, ``ReadCosts``; its rank alone misses which modules it adapts).
    file_bytes: int = 0

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def parse_lora_args(specs: list[str]) -> dict[str, str]:
    """``--lora NAME=DIR`` values as name -> directory (ValueError naming a malformed one, or a
    name given twice: the last silently won)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {spec!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"--lora {spec!r}: the name {name!r} is given twice (first as {name}={out[name]})")
        out[name] = path
    return out


def inspect_adapter(
    name: str,
    path: str | Path,
    cfg: ModelConfig,
    limits: AdapterLimits | None = None,
    roots: Sequence[str | Path] | None = None,
) -> AdapterSpec:
    """Read and validate a PEFT LoRA directory without torch (AdapterError says why it is
    unusable). ``roots``: where its files must resolve to (``read_adapter_files``).

    Its config and safetensors header are judged against the base and ``limits`` before the
    weights' data is read: a 7B adapter registered on a 1B base, or one over max_lora_rank, was
    read whole (gigabytes) first. (A worker's ``load_adapter`` reads whole: a registered version's
    rewritten files are told by their digest.)"""
    limits = limits or AdapterLimits()
    weights_file = Path(path) / WEIGHTS_FILE

    def judge(conf_bytes: bytes, header: dict[str, TensorInfo]) -> None:
        _modules(name, weights_file, read_config(name, Path(path), conf_bytes), header, cfg, limits)

    return validate(name, path, *read_adapter_files(name, path, limits, roots, judge), cfg, limits)


def validate(
    name: str,
    path: str | Path,
    conf_bytes: bytes,
    weight_bytes: bytes,
    cfg: ModelConfig,
    limits: AdapterLimits | None = None,
) -> AdapterSpec:
    """The adapter these files hold, checked against the base and ``limits``: config fields as
    PEFT reads them, tensor names, dtypes, pairs, layers, shapes, ranks, scalings and every
    weight's value (AdapterError with the reason otherwise; AdapterRefused, carrying the files'
    digest, where only ``limits`` refuse them)."""
    try:
        return _validate(name, path, conf_bytes, weight_bytes, cfg, limits or AdapterLimits())
    except AdapterRefused as e:
        e.digest = content_digest(conf_bytes, weight_bytes)
        raise


def _validate(
    name: str, path: str | Path, conf_bytes: bytes, weight_bytes: bytes, cfg: ModelConfig, limits: AdapterLimits
) -> AdapterSpec:
    path = Path(path)
    weights_file = path / WEIGHTS_FILE
    conf = read_config(name, path, conf_bytes)
    try:
        header = safetensors_header(weight_bytes)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {weights_file} ({e})") from None
    modules = _modules(name, weights_file, conf, header, cfg, limits)
    # Every tensor, used or not: a file carrying NaN anywhere (or weights of no float dtype, as
    # ``safetensors_header`` refuses them at registration) is not one to trust.
    for key, info in header.items():
        if (problem := value_problem(weight_bytes, info, limits)) is not None:
            raise AdapterError(f"adapter {name!r}: {weights_file}: tensor {key!r} {problem}")
    digest = content_digest(conf_bytes, weight_bytes)
    return AdapterSpec(name, path, modules, digest, len(conf_bytes) + len(weight_bytes))


def _modules(
    name: str,
    weights_file: Path,
    conf: dict[str, Any],
    header: dict[str, TensorInfo],
    cfg: ModelConfig,
    limits: AdapterLimits,
) -> dict[tuple[int, str], ModuleSpec]:
    """What the header's tensors adapt under ``conf``, checked against the base and ``limits``
    (their values aside), or AdapterError / AdapterRefused."""
    if (saved := _saved_module(conf.get("modules_to_save") or [], cfg)) is not None:
        raise AdapterError(
            f"adapter {name!r}: modules_to_save {saved!r} names a module of the base, which PEFT trains and loads "
            "whole over the base's (with its weights saved, or the base's own where they are not): not served"
        )
    shapes = {key: info.shape for key, info in header.items()}

    fits, chosen = targets(cfg), Targets(name, conf)
    targeted: dict[tuple[int, str], bool] = {}  # (each module matched once: an EVA config's patterns are slow)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    lora_seen = False
    for key in shapes:
        if _absent_head(key):
            continue  # PEFT leaves it unloaded: plain LoRA's output
        m = _KEY.fullmatch(key)
        if not m and key.endswith(".bias"):
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is a bias (a base layer's, saved under bias="
                f"{conf.get('bias', 'none')!r}, which PEFT loads over the base model's), which is not served"
            )
        if not m and any(f"{other.rsplit('.', 1)[-1]}." in key for other in _OTHER_MODULES):
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is for embed_tokens or lm_head (LoRA on them, or their whole "
                "weights saved beside a resized vocabulary), which is not served"
            )
        if ".lora_" not in key and key.endswith(".weight"):
            # (peft 0.21 loads base_model.model.model.norm.weight over the final norm, saying
            # nothing: the logits differ from the plain adapter's; the base's weights are every
            # adapter's here, not one's)
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is a whole weight of a module of the base model, which PEFT "
                "loads over the base's (a module fine-tuned whole, as modules_to_save saves one): not served, "
                "only LoRA weights are"
            )
        if not m or m.group(3) not in TARGET_NAMES:
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA weight of {', '.join(TARGET_NAMES)} "
                "in the language model's layers (base_model.model.model.layers.N...)"
            )
        lora_seen, at = True, (int(m.group(1)), m.group(3))
        if at not in targeted:
            targeted[at] = chosen.targeted(_module(*at))
        if not targeted[at]:
            # PEFT makes no LoRA layer there and never reads the tensor, whatever its adapter name
            # or block (nor a second copy): plain LoRA's output, as PEFT serves it
            continue
        if m.group(2) != _parent(m.group(3)):  # PEFT finds no such module, and loads nothing from it
            raise AdapterError(f"adapter {name!r}: tensor {key!r}: {m.group(3)} is under {_parent(m.group(3))}")
        if m.group(5) not in _KEY_NAMES:
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} carries the adapter name {m.group(5)!r}, which PEFT does not "
                "load (it loads lora_A.weight, or lora_A.default.weight)"
            )
        pair = pairs.setdefault(at, {})
        if (other := pair.get(m.group(4))) is not None:  # one module's weight twice: which is meant?
            raise AdapterError(f"adapter {name!r}: tensors {other!r} and {key!r} are the same LoRA weight")
        pair[m.group(4)] = key
    if not lora_seen:
        raise AdapterError(f"adapter {name!r}: {weights_file} holds no LoRA weights")

    modules: dict[tuple[int, str], ModuleSpec] = {}
    for (layer, target), ab in sorted(pairs.items()):
        where = f"adapter {name!r}: layer {layer} {target}"
        module = _module(layer, target)
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: has lora_{''.join(ab)} but not both lora_A and lora_B")
        if layer >= cfg.num_layers:
            raise AdapterError(f"{where}: the base model has {cfg.num_layers} layers")
        a, b, t = shapes[ab["A"]], shapes[ab["B"]], fits[target]
        rank = a[0] if a else 0
        if len(a) != 2 or len(b) != 2 or a[1] != t.in_features or b != (t.out_features, rank):
            raise AdapterError(
                f"{where}: lora_A {a} / lora_B {b} do not fit the base ({t.in_features} -> {t.out_features})"
            )
        r = int(chosen.pattern_value(conf.get("rank_pattern") or {}, module, conf["r"]))
        if r != rank:
            raise AdapterError(f"{where}: tensors have rank {rank}, adapter_config.json says r={r}")
        if rank > limits.max_lora_rank:
            raise AdapterOverLimit(f"{where}: rank {rank} is above max_lora_rank={limits.max_lora_rank}")
        alpha = float(chosen.pattern_value(conf.get("alpha_pattern") or {}, module, conf["lora_alpha"]))
        scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        # alpha is checked finite and positive, but a tiny or huge one still makes a scale of 0 or
        # one that swamps the base's output
        if not (math.isfinite(scale) and 0 < scale <= limits.max_scale):
            raise AdapterOverLimit(
                f"{where}: scaling lora_alpha {'/ sqrt(r)' if conf.get('use_rslora') else '/ r'} = "
                f"{alpha:g} / {r} = {scale:g} is not in (0, max_scale={limits.max_scale:g}]"
            )
        modules[(layer, target)] = ModuleSpec(ab["A"], ab["B"], rank, scale)
    if not modules:
        raise AdapterError(
            f"adapter {name!r}: none of its weights is on a module its target_modules, "
            "exclude_modules and layers_to_transform select"
        )
    if conf.get("init_lora_weights") is False and (bare := _unweighted(chosen, cfg, pairs)):
        raise AdapterError(
            f"adapter {name!r}: its config selects {bare} but the file holds no weights for it, and with "
            "init_lora_weights false PEFT leaves such a module's LoRA at random values (not a zero delta)"
        )
    return modules


def _absent_head(key: str) -> bool:
    """Whether ``key`` is a weight of a top-level module this causal LM lacks: whole (a
    sequence-classification adapter's ``score.weight``, ``modules_to_save: ["score"]``; TRL's
    ``v_head``) or the module's own LoRA pair (``score.lora_A.weight``: a classification adapter
    whose ``target_modules`` names its head). PEFT makes no LoRA layer on a module the model lacks,
    and its ``set_peft_model_state_dict`` loads with ``strict=False``, leaving such a key unexpected
    without a word: the base serves the adapter's other LoRA weights, plain LoRA (peft 0.21 on the
    tiny Llama, logits equal: ``tests/engine/test_lora_head_replays.py``), where vLLM refuses it
    ("expected target modules in [...] but received ['score']"). A LoRA weight of another part's
    layers stays refused: under another prefix it is a mismatched adapter served as the base
    (vLLM #34186)."""
    top = key.removeprefix("base_model.model.").split(".", 1)[0]
    return top not in _BASE_TOP and (".lora_" not in key or _HEAD_LORA.fullmatch(key) is not None)


def _module(layer: int, target: str) -> str:
    """The base model's name of a projection (a Llama-family layer's ``self_attn`` or ``mlp``)."""
    return f"model.layers.{layer}.{_parent(target)}.{target}"


def _parent(target: str) -> str:
    return "self_attn" if target in TARGET_NAMES[:4] else "mlp"


def _saved_module(names: list[str], cfg: ModelConfig) -> str | None:
    """The first of ``modules_to_save`` that names a module of the base holding weights, as PEFT's
    ``_set_trainable`` finds one (a module name ending in it); None: PEFT wraps nothing that
    changes the output. A module without weights (``rotary_emb``, ``act_fn``: its buffers are
    computed from the base's config) PEFT wraps and saves nothing of, and serves as plain LoRA, as
    peft 0.21 does on the tiny Llama, logits equal (tests/engine/test_peft_lenient.py); so is it here."""
    if not names:
        return None
    parts = ("", ".input_layernorm", ".post_attention_layernorm", ".self_attn", ".mlp")
    layers = [f"model.layers.{i}{part}" for i in range(cfg.num_layers) for part in parts]
    modules = ["model", "model.layers", "model.norm", *_OTHER_MODULES, *layers]
    # each projection with the LoRA layer's own parts (PEFT wraps the model once LoRA is in, and
    # fails to load on one of these)
    lora = ["", ".base_layer", ".lora_A", ".lora_B", ".lora_A.default", ".lora_B.default", ".lora_dropout"]
    lora += [".lora_dropout.default", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"]
    modules += [_module(i, t) + part for i in range(cfg.num_layers) for t in TARGET_NAMES for part in lora]
    # every string suffix of every name ("" too: it ends them all), looked up once a name: a
    # hostile config's 50,000 names against an 80-layer base's 4,400 names one by one would be 220
    # million comparisons
    ends = {m[i:] for m in modules for i in range(len(m) + 1)}
    return next((n for n in names if n in ends), None)


def _unweighted(chosen: Targets, cfg: ModelConfig, pairs: dict[tuple[int, str], dict[str, str]]) -> str | None:
    """A module the config selects that the file has no weights for (None: there is none)."""
    for layer in range(cfg.num_layers):
        for target in TARGET_NAMES:
            if (layer, target) not in pairs and chosen.targeted(module := _module(layer, target)):
                return module
    return next((m for m in _OTHER_MODULES if chosen.targeted(m)), None)


def content_digest(config: bytes, weights: bytes) -> str:
    """An adapter version: SHA-256 of its config and weights files (every file read), each
    prefixed by its length so bytes cannot move from one to the other unseen; 16 hex digits."""
    h = hashlib.sha256()
    for part in (config, weights):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]
