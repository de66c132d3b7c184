"""The base model's architecture, read from a Hugging Face ``config.json``.

One dataclass covers the Llama family the engine serves (Llama, Mistral, Qwen2): they differ only
in attention biases, tied embeddings, head sizes, RoPE scaling and attention windows, which are all
fields here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dlora.common.sampling import INT64, RANGES

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2"}
# The context transformers' config classes take where config.json does not say (LlamaConfig,
# MistralConfig, Qwen2Config; transformers 4 and 5), and their KV heads (LlamaConfig's: the
# attention heads).
_POSITIONS = {"llama": 2048, "mistral": 131_072, "qwen2": 32_768}
_KV_HEADS = {"mistral": 8, "qwen2": 32}


class ModelConfigError(ValueError):
    """The model directory's config cannot be served; the message names the bad field."""


def served_name(model: str | Path, served_model_name: str | None = None) -> str:
    """The name requests give the base model: ``served_model_name``, else the model directory's own
    name, its path made absolute first (``--model .`` named it "", and every request's 404).
    Symbolic links are not followed: a link's name is the one its user chose."""
    return served_model_name or Path(os.path.abspath(model)).name


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # q/k/v projections carry a bias (Qwen2 always; Llama with attention_bias, as transformers').
    qkv_bias: bool
    # Normalised RoPE parameters: always has "rope_theta" and "rope_type".
    rope: dict[str, Any] = field(default_factory=dict)
    # Attention window of Mistral / Qwen2 configs that use one; None: full attention.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # o_proj carries a bias (Llama with attention_bias: transformers' LlamaAttention and vLLM's
    # llama.py give o_proj one beside q/k/v; Qwen2's and Mistral's never have one).
    o_bias: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def context_length(self) -> int:
        """Longest sequence (prompt + output) the model serves."""
        length = self.max_position_embeddings
        # Dynamic NTK stretches RoPE past max_position_embeddings by its factor; the other
        # scalings already state the extended length there.
        if self.rope["rope_type"] == "dynamic":
            length = int(length * float(self.rope["factor"]))
        # Attention is full, so a sliding-window model is served only up to its window, where
        # the two agree.
        if self.sliding_window is not None:
            length = min(length, self.sliding_window)
        return length

    def longest_supported(self) -> int:
        """The longest ``max_model_len`` one may set: ``context_length``, or where longer, a linear
        or YaRN scaling's factor times the positions it scales (YaRN's original ones), as vLLM
        derives it (Qwen2.5 given its YaRN block keeps max_position_embeddings 32,768 and serves
        131,072; a review)."""
        length = self.context_length()
        if self.rope["rope_type"] in ("linear", "yarn") and self.rope.get("factor"):
            positions = self.max_position_embeddings
            if self.rope["rope_type"] == "yarn":
                positions = int(self.rope.get("original_max_position_embeddings") or positions)
            scaled = int(positions * float(self.rope["factor"]))
            length = max(length, scaled if self.sliding_window is None else min(scaled, self.sliding_window))
        return length

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelConfigError(f"{path}: not found (is {model_dir} a Hugging Face model directory?)") from None
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
        cfg = cls.from_dict(raw, source=str(path))
        # generation_config.json may name more end-of-sequence ids than config.json (Llama 3
        # Instruct: <|eot_id|> beside <|end_of_text|>); transformers' generate and vLLM stop at
        # every one of them (vLLM #4180), and at config.json's only where it names none (the
        # engine adds the tokenizer's own, as vLLM does).
        generation = _generation_config(Path(model_dir))
        try:
            named = _as_ids(generation.get("eos_token_id"))
        except (TypeError, ValueError):
            raise ModelConfigError(
                f"{Path(model_dir) / 'generation_config.json'}: eos_token_id must be a token id or a list of them"
            ) from None
        if generation.get("eos_token_id") is None:
            return cfg
        return replace(cfg, eos_token_ids=tuple(dict.fromkeys(named)))  # [] too: the tokenizer's alone, as vLLM

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """The architecture ``raw`` (a parsed config.json) describes.

        Raises:
            ModelConfigError: an architecture, activation, quantization or scaling not served, or
                a field missing or of the wrong kind; the message names the field.
        """
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"{source}: model_type {model_type!r} is not served; expected one of {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not served; expected 'silu'")
        if raw.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias=true is not served")
        for key in ("quantization_config", "compression_config"):  # fp8, GPTQ, AWQ, llm-compressor
            if raw.get(key):
                method = raw[key].get("quant_method") if isinstance(raw[key], dict) else None
                raise ModelConfigError(
                    f"{source}: {key} (quant_method {method!r}) is not served; give the model's weights unquantized"
                )
        hidden = _count(raw, "hidden_size", source)
        heads = _count(raw, "num_attention_heads", source)
        kv_heads = _count(raw, "num_key_value_heads", source, default=_KV_HEADS.get(model_type, heads))
        if raw.get("head_dim") is None and hidden % heads:
            raise ModelConfigError(
                f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} (and no head_dim)"
            )
        if heads % kv_heads:
            raise ModelConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        eps = raw.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise ModelConfigError(f"{source}: rms_norm_eps must be a number in (0, 1), got {eps!r}")
        attention_bias = bool(raw.get("attention_bias")) and model_type == "llama"  # transformers reads it there alone
        try:
            eos = _as_ids(raw.get("eos_token_id"))
        except (TypeError, ValueError):
            raise ModelConfigError(f"{source}: eos_token_id must be a token id or a list of them") from None
        bos = raw.get("bos_token_id")
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
            raise ModelConfigError(f"{source}: bos_token_id must be a token id, got {bos!r}")
        return cls(
            model_type=model_type,
            vocab_size=_count(raw, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_count(raw, "intermediate_size", source),
            num_layers=_count(raw, "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=_count(raw, "head_dim", source, default=hidden // heads),
            rms_norm_eps=float(eps),
            max_position_embeddings=_count(raw, "max_position_embeddings", source, default=_POSITIONS[model_type]),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            rope=_rope_parameters(raw, source),
            sliding_window=_sliding_window(raw, source),
            bos_token_id=bos,
            eos_token_ids=eos,
        )


def _count(raw: dict[str, Any], key: str, source: str, default: int | None = None, low: int = 1) -> int:
    """``raw[key]``, an integer at least ``low`` (``default`` where absent or null).

    Raises:
        ModelConfigError: it is missing without a default, or not such an integer.
    """
    value = raw.get(key)
    if value is None:
        if default is None:
            raise ModelConfigError(f"{source}: missing field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ModelConfigError(f"{source}: {key} must be an integer of at least {low}, got {value!r}")
    return value


def _sliding_window(raw: dict[str, Any], source: str) -> int | None:
    """The attention window some layer uses, as transformers reads the config: Mistral's (4096 when
    the key is missing, null: none); Qwen2's only with use_sliding_window, and then on layers from
    max_window_layers on (none when that is the layer count); Llama's never (no window there)."""
    if raw["model_type"] == "llama":
        return None
    if raw["model_type"] == "qwen2" and not (  # 28: Qwen2Config's default
        raw.get("use_sliding_window") and _count(raw, "max_window_layers", source, 28, 0) < raw["num_hidden_layers"]
    ):
        return None
    if raw["model_type"] == "mistral" and "sliding_window" not in raw:
        return MISTRAL_SLIDING_WINDOW  # transformers' MistralConfig default (read as none, a helper: wrong past it)
    if not raw.get("sliding_window"):
        return None
    return _count(raw, "sliding_window", source)


# MistralConfig's sliding_window when config.json does not say (transformers 4 and 5).
MISTRAL_SLIDING_WINDOW = 4096


# What vLLM's --generation-config auto (its default) takes from generation_config.json as the
# defaults of requests that leave them out (vLLM's ModelConfig.get_diff_sampling_param): each
# where it differs from transformers' GenerationConfig default (vLLM reads the file's diff from
# those: a top_k of 50 there is no top-k), max_new_tokens as max_tokens. Per name: transformers'
# default, and whether it is an integer; its range is a request's (``common.sampling.RANGES``).
_SAMPLING: dict[str, tuple[float | None, bool]] = {
    "temperature": (1.0, False),
    "top_p": (1.0, False),
    "top_k": (50, True),
    "min_p": (None, False),
    "repetition_penalty": (1.0, False),
    "max_new_tokens": (None, True),
}


def sampling_defaults(model_dir: str | Path) -> dict[str, float]:
    """The model's own sampling defaults (``_SAMPLING``): temperature, top_p, top_k, min_p,
    repetition_penalty and max_tokens, those its generation_config.json sets ({} without it).

    Raises:
        ModelConfigError: the file is not a JSON object, or one of those is not a number in the
            range a request may give it (``RANGES``, in the words a request's 400 has).
    """
    path = Path(model_dir) / "generation_config.json"
    generation = _generation_config(Path(model_dir))
    out: dict[str, float] = {}
    for key, (hf_default, integer) in _SAMPLING.items():
        value = generation.get(key)
        if value is None or value == hf_default:
            continue
        name = "max_tokens" if key == "max_new_tokens" else key
        kind = int if integer else int | float
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ModelConfigError(f"{path}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}")
        # (an integer past 64 bits would fail the bus's encoding at each request, not here)
        if (why := (INT64.problem(key, value) if integer else None) or RANGES[name].problem(key, value)) is not None:
            raise ModelConfigError(f"{path}: {why}")
        out[name] = value
    return out


def _generation_config(model_dir: Path) -> dict[str, Any]:
    """The model's generation_config.json ({} without one).

    Raises:
        ModelConfigError: it is not a JSON object.
    """
    path = model_dir / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return raw


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ids):
        raise ValueError(f"not a token id: {value!r}")
    return tuple(ids)


def _rope_parameters(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Merge the two spellings of RoPE settings into one dict.

    transformers < 5 writes ``rope_theta`` plus an optional ``rope_scaling`` dict (whose type key is
    ``type`` in older files and ``rope_type`` in newer); transformers >= 5 writes ``rope_parameters``.
    """
    params: dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):
        given = raw.get(key) or {}
        if not isinstance(given, dict):
            raise ModelConfigError(f"{source}: {key} must be a JSON object, got {given!r}")
        params.update(given)
    if raw.get("rope_parameters") and raw.get("rope_scaling") and (conflict := _rope_conflict(raw)):
        # transformers reads rope_scaling alone then (rope_theta from the top level, else 10000),
        # merged here: another theta, wrong tokens from the first (a helper, Qwen2.5's README YaRN
        # block added to a transformers 5 config). Neither reading is surely the author's: refused.
        raise ModelConfigError(
            f"{source}: rope_parameters and rope_scaling disagree on {conflict} (transformers reads "
            "rope_scaling alone, with the top-level rope_theta or 10000); keep one of them"
        )
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("type", None) or params.get("rope_type") or "default"
    params["rope_type"] = rope_type
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelConfigError(f"{source}: partial_rotary_factor is not served")
    if rope_type in ("llama3", "yarn", "longrope"):  # transformers' standardisation of the pretraining length
        if "original_max_position_embeddings" in raw:  # beside the rope settings (Phi-3's): it wins, as there
            params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        else:
            params.setdefault(
                "original_max_position_embeddings", raw.get("max_position_embeddings", _POSITIONS[raw["model_type"]])
            )
    for key in _ROPE_NUMBERS:
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise ModelConfigError(f"{source}: RoPE's {key} must be a positive number, got {value!r}")
    params["rope_theta"] = float(params["rope_theta"] or 10000.0)
    missing = [k for k in _ROPE_NEEDS.get(rope_type, ()) if params.get(k) is None]
    if rope_type == "yarn" and "factor" not in params:  # null: from the two lengths (DeepSeek's), as transformers
        missing.append("factor")
    if missing:
        raise ModelConfigError(f"{source}: rope_type {rope_type!r} needs {', '.join(missing)} in rope_scaling")
    return params


def _rope_conflict(raw: dict[str, Any]) -> str | None:
    """The first RoPE setting on which config.json's ``rope_parameters`` and ``rope_scaling`` (read
    as transformers reads it then: with the top-level ``rope_theta``, else 10000) disagree."""

    def normal(d: dict[str, Any]) -> dict[str, Any]:
        """As transformers completes each: the top-level theta (else 10000), the pretraining length
        where the type has one (a review: identical blocks, the theta at the top, were refused)."""
        out = {k: v for k, v in d.items() if k != "type"}
        out["rope_type"] = d.get("rope_type") or d.get("type") or "default"
        out.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
        if out["rope_type"] in ("llama3", "yarn", "longrope"):
            out.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
        return out

    new, old = normal(raw["rope_parameters"]), normal(raw["rope_scaling"])
    return next((k for k in sorted(new.keys() | old.keys()) if new.get(k) != old.get(k)), None)


# The RoPE settings the engine computes with (a string there failed deep in Rope at start-up).
_ROPE_NUMBERS = (
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
)

# What each scaling cannot do without (transformers reads them unguarded; a worker crashed on a bare
# KeyError at start-up instead).
_ROPE_NEEDS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


@dataclass(frozen=True)
class Target:
    """Where one HF projection lives in the engine's fused layout: rows [offset, offset+out) of
    ``fused`` (q|k|v run as one matmul, gate|up as one)."""

    fused: str  # attribute of the engine's LayerWeights
    offset: int
    out_features: int
    in_features: int


# PEFT target-module names, in the order the engine applies them.
TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def targets(cfg: ModelConfig) -> dict[str, Target]:
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "q_proj": Target("qkv", 0, q, h),
        "k_proj": Target("qkv", q, kv, h),
        "v_proj": Target("qkv", q + kv, kv, h),
        "o_proj": Target("o", 0, h, q),
        "gate_proj": Target("gate_up", 0, inter, h),
        "up_proj": Target("gate_up", inter, inter, h),
        "down_proj": Target("down", 0, h, inter),
    }


def same_model(a: str, b: str) -> bool:
    """Whether two ``model_digest``s may serve one request: equal, or either not said ("": an
    older service, an application's request)."""
    return not a or not b or a == b


# The fields the digest has covered at any value since it was made. A field ``ModelConfig`` gains
# later counts only where a model sets it off its default: ``o_bias``, added with False for every
# model that has none, changed every model's digest, and a gateway of one release refused every
# worker of the one before (503, another model) for the length of a rolling upgrade.
_DIGESTED_ALWAYS = frozenset(
    {
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
        "num_kv_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
        "qkv_bias", "rope", "sliding_window", "bos_token_id", "o_bias",
    }
)  # fmt: skip


def model_digest(cfg: ModelConfig, vocab: Mapping[str, int]) -> str:
    """16 hex digits of a SHA-256 over the model's parsed config and its tokenizer's vocabulary
    (``get_vocab()``: token -> id): what a gateway that tokenizes and a worker that runs must agree
    on. Services started apart (`dlora serve`, several hosts) named one path that held another
    revision on one host, and token ids of one vocabulary ran in a model of another, without a word.
    Parsed, not the files' bytes: a gateway's host may hold only the config and tokenizer, re-saved
    by another transformers release, or tokenizer.json without the slow tokenizer's files. Not the
    weights (gigabytes at each start): weights retrained in place with the same shapes agree."""
    # Not the end-of-sequence ids: generation_config.json adds to them (Llama 3's), and a gateway's
    # host without that file read as another model (a review); they decide when to stop, not what ids mean.
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cfg)}
    digested = {
        k: v for k, v in asdict(cfg).items() if k in _DIGESTED_ALWAYS or (k != "eos_token_ids" and v != defaults[k])
    }
    h = hashlib.sha256(json.dumps(digested, sort_keys=True, default=str).encode())
    for token, token_id in sorted(vocab.items(), key=lambda item: item[1]):
        h.update(f"{token_id}\0{token}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]
