"""LoRA adapters read from PEFT directories into host memory, validated against the base model.

Only safetensors are read. Scaling follows PEFT: ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), with ``rank_pattern`` / ``alpha_pattern`` overrides matched on module names.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from dlora.services.worker.engine.config import ModelConfig
from dlora.services.worker.engine.weights import TARGET_NAMES, targets

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """The adapter directory cannot be served; the message says why."""


@dataclass
class LoraWeight:
    a: torch.Tensor  # (rank, in_features)
    b: torch.Tensor  # (out_features, rank)
    scale: float


@dataclass
class LoraAdapter:
    name: str
    path: Path
    # (layer index, PEFT target name such as "q_proj") -> weights
    weights: dict[tuple[int, str], LoraWeight]
    # What this adapter is, whatever its name: a digest of adapter_config.json and the weights
    # file (``content_digest``). A name re-registered with other files is another version.
    digest: str = ""

    @property
    def rank(self) -> int:
        return max(w.a.shape[0] for w in self.weights.values())

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())

    @property
    def target_names(self) -> set[str]:
        return {t for _, t in self.weights}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches a pattern key against the module's full name, anchored at a dot or the start.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(name: str, path: str | Path, cfg: ModelConfig) -> LoraAdapter:
    """Read and validate a PEFT LoRA directory; raise AdapterError with the reason if it is unusable."""
    path = Path(path)
    conf_path = path / "adapter_config.json"
    weights_path = path / "adapter_model.safetensors"
    if not conf_path.is_file():
        raise AdapterError(f"adapter {name!r}: {conf_path} not found")
    if not weights_path.is_file():
        extra = " (only safetensors are loaded)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"adapter {name!r}: {weights_path} not found{extra}")
    try:
        conf_bytes, weight_bytes = conf_path.read_bytes(), weights_path.read_bytes()
        conf = json.loads(conf_bytes)
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot read {path} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: {conf_path} is not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"adapter {name!r}: {conf_path} is not a JSON object")
    _check_config(name, conf)
    try:
        tensors = load(weight_bytes)
    except SafetensorError as e:
        raise AdapterError(f"adapter {name!r}: cannot read {weights_path} ({e})") from None

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if not m or m.group(2) not in TARGET_NAMES:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA weight of {', '.join(TARGET_NAMES)}")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {weights_path} holds no LoRA weights")

    shapes = targets(cfg)
    weights: dict[tuple[int, str], LoraWeight] = {}
    for (layer, target), ab in sorted(pairs.items()):
        where = f"adapter {name!r}: layer {layer} {target}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: has lora_{''.join(ab)} but not both lora_A and lora_B")
        if layer >= cfg.num_layers:
            raise AdapterError(f"{where}: the base model has {cfg.num_layers} layers")
        a, b, t = ab["A"], ab["B"], shapes[target]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != t.in_features or b.shape != (t.out_features, rank):
            raise AdapterError(
                f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"({t.in_features} -> {t.out_features})"
            )
        module = f"model.layers.{layer}.{'self_attn' if target in TARGET_NAMES[:4] else 'mlp'}.{target}"
        r = int(_pattern_value(conf.get("rank_pattern") or {}, module, conf["r"]))
        if r != rank:
            raise AdapterError(f"{where}: tensors have rank {rank}, adapter_config.json says r={r}")
        alpha = float(_pattern_value(conf.get("alpha_pattern") or {}, module, conf["lora_alpha"]))
        scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        weights[(layer, target)] = LoraWeight(a=a, b=b, scale=scale)
    return LoraAdapter(name=name, path=path, weights=weights, digest=content_digest(conf_bytes, weight_bytes))


def content_digest(config: bytes, weights: bytes) -> str:
    """An adapter version: SHA-256 of its config and weights files, 16 hex digits."""
    h = hashlib.sha256()
    for part in (config, weights):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _check_config(name: str, conf: dict[str, Any]) -> None:
    def refuse(reason: str) -> None:
        raise AdapterError(f"adapter {name!r}: {reason}")

    if conf.get("peft_type", "LORA") != "LORA":
        refuse(f"peft_type {conf.get('peft_type')!r} is not LORA")
    for key in ("r", "lora_alpha"):
        if not isinstance(conf.get(key), (int, float)) or conf[key] <= 0:
            refuse(f"adapter_config.json needs a positive {key!r}")
    if conf.get("use_dora"):
        refuse("DoRA adapters are not served")
    if conf.get("modules_to_save"):
        refuse("modules_to_save (full fine-tuned modules) are not served")
    if conf.get("bias", "none") != "none":
        refuse(f"bias={conf['bias']!r} is not served")
    if conf.get("fan_in_fan_out"):
        refuse("fan_in_fan_out adapters are not served")
