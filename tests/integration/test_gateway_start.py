"""What a gateway's start costs: an operator's restart drill found it refusing connections for
10-14 s, most of it torch, imported by transformers' AutoTokenizer for a process that runs no
model. A Llama folder whose tokenizer AutoTokenizer would load as the generic fast class is loaded
as that class directly: the same tokenizer, and no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from dlora.model.make_tiny import TinyOutput
from dlora.model.tokenizer import _generic, load_tokenizer

TEXTS = ["kalo remi", "<s> x </s>", "", "ünï cödé 🙂"]


def test_a_gateway_is_built_without_importing_torch(tiny_llama: TinyOutput) -> None:
    code = (
        "import sys\n"
        "from dlora.services.gateway.main import Gateway\n"
        "from dlora.services.gateway.settings import GatewaySettings\n"
        f"Gateway(GatewaySettings(model={str(tiny_llama.model)!r}), None, None)\n"
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


def test_the_generic_class_is_loaded_only_where_autotokenizer_would_load_it(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    model = Path(tiny_llama.model)
    cases = {
        "as-made": ({}, {}, True),
        "fast": ({}, {"tokenizer_class": "PreTrainedTokenizerFast"}, True),
        # what a folder's tokenizer_config may set beyond its class, each read the same way
        "settings": ({}, {"padding_side": "left", "add_bos_token": False, "model_max_length": 77}, True),
        "remote": ({}, {"auto_map": {"AutoTokenizer": ["x.Y", None]}}, False),
        "llama-class": ({}, {"tokenizer_class": "LlamaTokenizer"}, False),  # (its ByteLevel check)
        "qwen2": ({"model_type": "qwen2"}, {}, False),  # AutoTokenizer overrides the class declared
    }
    for name, (config, declared, generic) in cases.items():
        folder = _with(model, tmp_path, name, config, declared)
        assert _generic(folder) is generic, name
        if generic:
            ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
            assert type(ours) is type(theirs), name
            assert [ours(t).input_ids for t in TEXTS] == [theirs(t).input_ids for t in TEXTS], name
            assert ours.all_special_ids == theirs.all_special_ids and ours.chat_template == theirs.chat_template
            assert _settings(ours) == _settings(theirs), name
    (tmp_path / "as-made" / "tokenizer.json").unlink()
    assert not _generic(tmp_path / "as-made")  # AutoTokenizer's own refusal, said as before


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
