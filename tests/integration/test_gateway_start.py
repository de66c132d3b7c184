"""What a gateway's start costs: an operator's restart drill found it refusing connections for
10-14 s, most of it torch, imported by transformers' AutoTokenizer for a process that runs no
model. A Llama, Qwen2 or Mistral folder whose tokenizer class AutoTokenizer's choice is known for
is loaded as that class directly: the same tokenizer, and no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from dlora.model.make_tiny import TinyOutput
from dlora.model.tokenizer import _direct, load_tokenizer

TEXTS = ["kalo remi", "<s> x </s>", "", "ünï cödé 🙂"]
# Mistral's own folders declare the Llama fast class over a Mistral config (Mistral-7B-v0.1's)
MISTRAL = ({"model_type": "mistral"}, {"tokenizer_class": "LlamaTokenizerFast"})


def test_a_gateway_is_built_without_importing_torch(
    tiny_llama: TinyOutput, tiny_qwen: TinyOutput, tmp_path: Path
) -> None:
    mistral = _with(Path(tiny_llama.model), tmp_path, "mistral", *MISTRAL)
    code = (
        "import sys\n"
        "from dlora.model.tokenizer import load_tokenizer\n"
        "from dlora.services.gateway.main import Gateway\n"
        "from dlora.services.gateway.settings import GatewaySettings\n"
        f"Gateway(GatewaySettings(model={str(tiny_llama.model)!r}), None, None)\n"
        f"Gateway(GatewaySettings(model={str(tiny_qwen.model)!r}), None, None)\n"
        f"load_tokenizer({str(mistral)!r})\n"
        "print(sorted(m for m in ('torch', 'transformers.modeling_utils') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


def _with(folder: Path, tmp_path: Path, name: str, config: dict, declared: dict) -> Path:
    out = tmp_path / name
    shutil.copytree(folder, out)
    for file, changes in (("config.json", config), ("tokenizer_config.json", declared)):
        path = out / file
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return out


def test_a_class_is_loaded_directly_only_where_autotokenizer_would_load_it(
    tiny_llama: TinyOutput, tiny_qwen: TinyOutput, tmp_path: Path
) -> None:
    model, generic = Path(tiny_llama.model), "PreTrainedTokenizerFast"
    # what a folder's tokenizer_config may set beyond its class, each read the same way
    settings = {"padding_side": "left", "add_bos_token": False, "model_max_length": 77}
    cases: dict[str, tuple[dict, dict, str | None]] = {
        "as-made": ({}, {}, generic),
        "fast": ({}, {"tokenizer_class": "PreTrainedTokenizerFast"}, generic),
        "settings": ({}, settings, generic),
        "remote": ({}, {"auto_map": {"AutoTokenizer": ["x.Y", None]}}, None),
        "llama-class": ({}, {"tokenizer_class": "LlamaTokenizer"}, None),  # (its ByteLevel check)
        # AutoTokenizer overrides the class a qwen2 folder declares with its own
        "qwen2": ({"model_type": "qwen2"}, {}, "Qwen2Tokenizer"),
        "qwen2-fast": ({"model_type": "qwen2"}, {"tokenizer_class": "Qwen2TokenizerFast"}, "Qwen2Tokenizer"),
        "qwen2-settings": ({"model_type": "qwen2"}, settings, "Qwen2Tokenizer"),
        "qwen2-remote": ({"model_type": "qwen2"}, {"auto_map": {"AutoTokenizer": ["x.Y", None]}}, None),
        "mistral": (*MISTRAL, generic),
        "mistral-settings": (MISTRAL[0], MISTRAL[1] | settings, generic),
        "mistral-slow": (MISTRAL[0], {"tokenizer_class": "LlamaTokenizer"}, None),
        "gemma": ({"model_type": "gemma"}, {}, None),
    }
    folders = {name: _with(model, tmp_path, name, config, declared) for name, (config, declared, _) in cases.items()}
    folders["tiny-qwen"], cases["tiny-qwen"] = Path(tiny_qwen.model), ({}, {}, "Qwen2Tokenizer")
    for name, (_, _, direct) in cases.items():
        folder = folders[name]
        assert _direct(folder) == direct, name
        if direct:
            ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
            assert type(ours) is type(theirs), name
            assert [ours(t).input_ids for t in TEXTS] == [theirs(t).input_ids for t in TEXTS], name
            assert ours.all_special_ids == theirs.all_special_ids and ours.chat_template == theirs.chat_template
            assert _settings(ours) == _settings(theirs), name
    (folders["mistral"] / "tekken.json").write_text("{}")  # mistral-common's, which AutoTokenizer may prefer
    (folders["as-made"] / "tokenizer.json").unlink()
    assert _direct(folders["mistral"]) is None
    assert _direct(folders["as-made"]) is None  # AutoTokenizer's own refusal, said as before


def test_qwen2_and_mistral_go_to_autotokenizer_under_transformers_4(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """pyproject allows transformers 4, whose AutoTokenizer loads a Qwen2 folder as
    Qwen2TokenizerFast and a Mistral one as LlamaTokenizerFast (a BOS added): its Qwen2Tokenizer is
    the slow class, which failed on a folder with only a tokenizer.json, and the generic class
    added no BOS (both seen under 4.57.1). A Llama folder's generic class is 4's choice too."""
    model = Path(tiny_llama.model)
    qwen2 = _with(model, tmp_path, "qwen2", {"model_type": "qwen2"}, {"tokenizer_class": "Qwen2Tokenizer"})
    mistral = _with(model, tmp_path, "mistral", *MISTRAL)
    llama = _with(model, tmp_path, "llama", {}, {"tokenizer_class": "PreTrainedTokenizerFast"})
    assert [_direct(f, major=4) for f in (qwen2, mistral, llama)] == [None, None, "PreTrainedTokenizerFast"]
    assert [_direct(f, major=5) for f in (qwen2, mistral)] == ["Qwen2Tokenizer", "PreTrainedTokenizerFast"]


def test_a_serve_command_line_is_parsed_without_the_simulator() -> None:
    # `dlora simulate`'s options import its cost model (numpy): ~1 s of every `dlora serve` before
    code = (
        "import sys\n"
        "from dlora.services.cli import build_parser\n"
        "args = build_parser().parse_args(['serve', 'gateway', '--model', 'm'])\n"
        "print(args.service, sorted(m for m in ('dlora.sim.options', 'dlora.sim.cost', 'numpy') if m in sys.modules))\n"
        "print(build_parser().parse_args(['simulate']).profile)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split("\n")[:2] == ["gateway []", "dlora-artifact"], done.stderr[-2000:]


def _settings(tokenizer: Any) -> tuple:
    return (
        tokenizer.padding_side,
        tokenizer.truncation_side,
        tokenizer.model_max_length,
        str(tokenizer.added_tokens_decoder),
        [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token],
        [tokenizer(t, add_special_tokens=True).input_ids for t in TEXTS],
        tokenizer.decode(tokenizer("kalo </s>").input_ids, skip_special_tokens=True),
    )
