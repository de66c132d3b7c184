"""`dlora generate` serves good lines and names bad ones; `dlora model make-tiny` is deterministic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dlora.model.make_tiny import TinyOutput
from dlora.services.cli import main
from tests.engine.oracle import Oracle


def test_generate_serves_good_lines_and_names_bad_ones(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    lines = [
        {"id": "a", "adapter": "lora-1", "prompt_token_ids": [5, 6, 7], "max_tokens": 6},
        "{not json",
        {"id": "b", "adapter": "nope", "prompt": "x"},
        {"id": "c", "prompt": "kalo remi", "max_tokens": 4, "temperature": 0.5, "seed": 3},
        {"id": "d", "prompt": "x", "tempreature": 0.5},
        {"id": "e", "prompt": "x", "max_tokens": -1},
        {"id": "f", "adapter": "lora-0", "prompt_token_ids": [9, 10], "max_tokens": 5},
        # past the context with its max_tokens: refused, as the gateway refuses it (it was served
        # and cut short at the context, "length", without a word)
        {"id": "g", "prompt_token_ids": [5] * 500, "max_tokens": 400},
        # a one-token prompt's prompt_logprobs are there, empty (the key was left out)
        {"id": "h", "prompt_token_ids": [5], "max_tokens": 1, "prompt_logprobs": 1},
        # the prompt's logprobs alone, as the gateway's echo with max_tokens 0 (refused before)
        {"id": "i", "prompt_token_ids": [5, 6, 7], "max_tokens": 0, "prompt_logprobs": 0},
        # a new user's trial: each of these took the whole run down (a traceback, the output empty)
        {"id": "e", "prompt": "kalo", "max_tokens": 2},  # an id a failed line gave
        {"id": "line-2", "prompt": "kalo", "max_tokens": 2},  # an id a bad line was given
        {"id": "j", "prompt": "x", "adapter": ["lora-0"]},
        '{"id": "k", "prompt": "hi \\ud800"}',  # JSON's lone surrogate: valid JSON, not text
        '{"id": "m", "prompt": "hi", "stop": ["\\udc00"]}',  # in any string of the line
        {"id": None, "prompt_token_ids": [True, False]},  # no id: its line's; bools are not token ids
        {"id": "n", "prompt_token_ids": [5, 6], "max_tokens": 0.0, "prompt_logprobs": 0},  # 0.0 is 0, as 1.0 is 1
        {"id": "o", "prompt_token_ids": [5, 6], "max_tokens": 0, "prompt_logprobs": 0, "min_tokens": 1},
        # logprobs are written out (they were computed and dropped)
        {"id": "l", "prompt_token_ids": [5, 6], "max_tokens": 2, "logprobs": 1},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(out), "--mode", "merged"]
    for name in ("lora-0", "lora-1"):
        argv += ["--lora", f"{name}={tiny_llama.adapters[name]}"]
    assert main(argv) == 1  # some lines failed

    results = [json.loads(line) for line in out.read_text().splitlines()]
    ids = ["a", "line-2", "b", "c", "d", "e", "f", "g", "h", "i", "e@line-11", "line-2@line-12", "j", "k"]
    ids += ["m", "line-16", "n", "o", "l"]
    assert [r["id"] for r in results] == ids
    errors = {r["id"]: r["error"] for r in results if "error" in r}
    assert errors["line-2"].startswith("line 2: not valid JSON")
    assert "line 3" in errors["b"] and "not registered" in errors["b"]
    assert "line 5" in errors["d"] and "tempreature" in errors["d"]
    assert "line 6" in errors["e"] and "max_tokens" in errors["e"]
    assert "line 8" in errors["g"] and "exceed the context" in errors["g"]
    oracle = Oracle(tiny_llama)
    by_id = {r["id"]: r for r in results}
    assert by_id["a"]["token_ids"] == oracle.generate("lora-1", [5, 6, 7], 6)
    assert by_id["f"]["token_ids"] == oracle.generate("lora-0", [9, 10], 5)
    assert by_id["a"]["finish_reason"] == "length" and len(by_id["c"]["token_ids"]) == 4
    assert by_id["h"]["prompt_logprobs"] == [] and "prompt_logprobs" not in by_id["a"]
    alone = by_id["i"]
    assert (alone["token_ids"], alone["text"], alone["finish_reason"]) == ([], "", "length")
    assert [entry[0] for entry in alone["prompt_logprobs"]] == [6, 7]
    assert "duplicate id 'e'" in errors["e@line-11"] and "duplicate id 'line-2'" in errors["line-2@line-12"]
    assert "adapter must be a string" in errors["j"] and "lone UTF-16 surrogate" in errors["k"]
    assert "lone UTF-16 surrogate" in errors["m"]
    assert "prompt_token_ids must be an integer, got True" in errors["line-16"]
    assert "max_tokens 0 asks for the prompt's logprobs alone" in errors["o"]
    assert (by_id["n"]["token_ids"], [e[0] for e in by_id["n"]["prompt_logprobs"]]) == ([], [6])
    logprobs = by_id["l"]["logprobs"]
    assert [entry[0] for entry in logprobs] == by_id["l"]["token_ids"] and all(len(e[2]) == 1 for e in logprobs)


def test_generate_refuses_a_bad_adapter_flag(tiny_llama: TinyOutput, tmp_path: Path, capsys) -> None:
    (tmp_path / "in.jsonl").write_text("")
    argv = [
        "generate",
        "--model",
        str(tiny_llama.model),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--lora",
        "broken",
    ]
    assert main(argv) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    # a name given twice: the last silently won (dlora up took it too)
    twice = [*argv[:-1], f"x={tiny_llama.adapters['lora-1']}", "--lora", f"x={tiny_llama.adapters['lora-2']}"]
    assert main(twice) == 2
    assert "the name 'x' is given twice" in capsys.readouterr().err


def test_generate_refuses_an_output_it_cannot_write_before_it_generates(
    tiny_llama: TinyOutput, tmp_path: Path, capsys
) -> None:
    """It wrote the output after the whole batch: a bad path lost the work to a traceback."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "kalo", "max_tokens": 2}) + "\n")
    for output in (tmp_path / "missing" / "out.jsonl", tmp_path):
        argv = ["generate", "--model", str(tiny_llama.model), "--input", str(tmp_path / "in.jsonl")]
        assert main([*argv, "--output", str(output)]) == 2
        assert "dlora generate:" in capsys.readouterr().err


def test_generate_names_a_model_folder_without_a_tokenizer(tiny_llama: TinyOutput, tmp_path: Path, capsys) -> None:
    """A model folder of weights alone: transformers' own message (five lines about backends and
    sentencepiece) came out without the folder's name."""
    model = tmp_path / "weights-only"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes((tiny_llama.model / name).read_bytes())
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "kalo", "max_tokens": 2}) + "\n")
    argv = ["generate", "--model", str(model), "--input", str(tmp_path / "in.jsonl")]
    assert main([*argv, "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model) in err and "tokenizer" in err and "Traceback" not in err


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():  # every file: adapter_config.json names the model by a relative path
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_make_tiny_is_deterministic_and_loads_offline(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "dlora.services.cli",
        "model",
        "make-tiny",
        "--adapters",
        "3",
        "--ranks",
        "4,8",
        "--seed",
        "5",
        "--arch",
        "qwen2",
    ]
    # Two independent processes, run side by side (each is mostly the import of torch): the same
    # seed must give the same bytes whichever finishes first.
    runs = {
        d: subprocess.Popen(
            [*cmd, "--out", str(tmp_path / d)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )
        for d in ("one", "two")
    }
    for d, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"make-tiny --out {d} failed:\n{out.decode()[-3000:]}"
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    tok = AutoTokenizer.from_pretrained(tmp_path / "one" / "model")
    assert tok.decode(tok.encode("kalo remi")) == "kalo remi"
    ranks = [
        json.loads((tmp_path / "one" / "adapters" / f"lora-{i}" / "adapter_config.json").read_text())["r"]
        for i in range(3)
    ]
    assert ranks == [4, 8, 4]
    # again into the same folder with fewer adapters: the folder holds what was asked, no more
    assert (
        main(["model", "make-tiny", "--adapters", "1", "--out", str(tmp_path / "one")]) == 0
    )  # in-process: a torch import less
    assert sorted(p.name for p in (tmp_path / "one" / "adapters").iterdir()) == ["lora-0"]
    # rank 1, which PEFT takes: the second adapter's alpha was rank // 2 = 0, a division by zero
    assert main(["model", "make-tiny", "--adapters", "2", "--ranks", "1", "--out", str(tmp_path / "r1")]) == 0
    alphas = [
        json.loads((tmp_path / "r1" / "adapters" / f"lora-{i}" / "adapter_config.json").read_text())["lora_alpha"]
        for i in range(2)
    ]
    assert alphas == [2, 2]


def test_generate_refuses_only_the_lines_it_cannot_read(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """A user's trial: one line nested 200,000 deep (a RecursionError) or holding a byte that is
    not UTF-8 lost the whole batch (a traceback; the file refused). Each is now its own line's
    error, and a prompt holding U+2028 (valid in a JSON string) is one line, not two."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(
        b'{"id": "a", "prompt_token_ids": [5, 6], "max_tokens": 2}\n'
        + b"[" * 200_000
        + b'\n{"id": "b", "prompt": "\xff\xfe"}\r\n'
        + '{"id": "c", "prompt": "kalo\u2028remi", "max_tokens": 2}\n'.encode()
        + b'{"id": "d", "prompt_token_ids": [7], "max_tokens": 2}\n'
        + b'{"id": "e", "prompt": "x", "temperature": NaN}\n'
    )
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(out)]) == 1
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(results) == ["a", "line-2", "line-3", "c", "d", "e"]
    assert results["e"]["error"] == "line 6: temperature must be a finite number, got nan"  # was: got null
    assert results["line-2"]["error"] == "line 2: not valid JSON (nested too deeply)"
    assert results["line-3"]["error"].startswith("line 3: not UTF-8 text (byte 0xff at column ")
    assert all(len(results[i]["token_ids"]) == 2 for i in "acd")


def test_generate_interrupted_leaves_the_output_as_it_was(
    tiny_llama: TinyOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C emptied --output (opened "w" before the batch) and lost the lines already served; a
    BOM (as Windows editors write) made line 1 invalid JSON; a folder as --output was found last."""
    from dlora.services.worker.engine import offline

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": "kalo", "max_tokens": 2}).encode() + b"\n")
    out.write_text("an earlier run's results\n")
    argv = ["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(out)]

    def interrupted(*args: object) -> list[dict]:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(offline, "generate_lines", interrupted)
        assert main(argv) == 130
    assert out.read_text() == "an earlier run's results\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out.jsonl",
    ]
    assert main(argv) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]
    assert main([*argv[:-1], str(tmp_path)]) == 2  # a folder: said before the batch runs


def test_generate_writes_through_a_link_keeps_the_files_mode_and_a_sigterm_leaves_it(
    tiny_llama: TinyOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review of the rename over --output: it replaced a link with a file (the link's target kept
    its old lines; /dev/stdout printed nothing), made a 0600 file 0644, and a SIGTERM left its
    temporary file behind."""
    import os
    import signal

    from dlora.services.worker.engine import offline

    inp, real, link = tmp_path / "in.jsonl", tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "kalo", "max_tokens": 2}) + "\n")
    real.write_text("old\n")
    real.chmod(0o600)
    link.symlink_to(real)
    argv = ["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(link)]
    assert main(argv) == 0
    assert link.is_symlink() and json.loads(real.read_text())["id"] == "a" and real.stat().st_mode & 0o777 == 0o600

    def terminated(*args: object) -> list[dict]:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not terminated")

    monkeypatch.setattr(offline, "generate_lines", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 143 and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "link.jsonl",
        "real.jsonl",
    ]
    assert signal.getsignal(signal.SIGTERM) is before  # put back


def test_generate_takes_the_shapes_vllm_sampling_params_take(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """A vLLM user's line: ``"stop": "x"`` (vLLM's SamplingParams takes a lone string, as the
    gateway does), null for a list it leaves unset, and ``"max_tokens": null`` (vLLM's LLM: up to
    the context) were each refused ("Expected `array`, got `str`")."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(out)]

    def run(lines: list[dict]) -> dict[str, dict]:
        inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
        main(argv)
        return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    greedy = run([{"id": "g", "prompt": "kalo remi", "max_tokens": 8}])["g"]
    stop = next(c for c in greedy["text"] if c.isalpha())  # a character the greedy text reaches
    lines = [
        {"id": "str", "prompt": "kalo remi", "max_tokens": 8, "stop": stop},
        {"id": "nulls", "prompt": "kalo remi", "max_tokens": 8, "stop": None, "stop_token_ids": None},
        {"id": "more", "prompt": "kalo remi", "max_tokens": 8, "bad_words": None, "allowed_token_ids": None},
        {"id": "bias", "prompt": "kalo remi", "max_tokens": 8, "logit_bias": None},
        {"id": "fill", "prompt_token_ids": [5] * 500, "max_tokens": None, "ignore_eos": True},
        {"id": "nofit", "prompt_token_ids": [5] * 512, "max_tokens": None},
        {"id": "odd", "prompt_token_ids": 5, "max_tokens": None},  # named, not a TypeError
        {"id": "stops", "prompt": "kalo remi", "max_tokens": 2, "stop": 3},  # still refused, named
        # integral floats are ints (vLLM's run_batch reads them so), a fraction is named
        {"id": "floats", "prompt": "kalo remi", "max_tokens": 8.0, "n": 1.0, "min_tokens": 0.0},
        {"id": "float_ids", "prompt_token_ids": [5.0] * 500, "max_tokens": None, "ignore_eos": True},
        {"id": "frac", "prompt": "kalo remi", "max_tokens": 8.5},
        {"id": "frac_n", "prompt": "kalo remi", "n": 2.5},
        {"id": "frac_ids", "prompt_token_ids": [5, 5.5]},
    ]
    by_id = run(lines)
    cut = greedy["text"].index(stop)
    assert (by_id["str"]["stop_reason"], by_id["str"]["text"]) == (stop, greedy["text"][:cut])
    assert all(by_id[i]["token_ids"] == greedy["token_ids"] for i in ("nulls", "more", "bias"))
    assert (len(by_id["fill"]["token_ids"]), by_id["fill"]["finish_reason"]) == (12, "length")
    assert "context" in by_id["nofit"]["error"] and "list of integers" in by_id["odd"]["error"]
    assert "stop" in by_id["stops"]["error"]
    assert by_id["floats"]["token_ids"] == greedy["token_ids"] and len(by_id["float_ids"]["token_ids"]) == 12
    assert "max_tokens must be an integer, got 8.5" in by_id["frac"]["error"]
    # in the gateway's words (``integers.whole``) as every integer field
    assert "n must be an integer, got 2.5" in by_id["frac_n"]["error"]
    assert "prompt_token_ids must be an integer, got 5.5" in by_id["frac_ids"]["error"]


def test_generate_takes_detokenize_false_as_vllm(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vLLM's ``SamplingParams(detokenize=False)``: the token ids, the text empty. A line that set
    it was refused as an unknown field; with stop strings it is refused, as vLLM refuses it."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    base = {"prompt": "kalo remi", "max_tokens": 6}
    lines = [
        {"id": "text", **base},
        {"id": "raw", **base, "detokenize": False},
        {"id": "on", **base, "detokenize": True},
        {"id": "rawn", **base, "detokenize": False, "n": 2, "temperature": 1.0, "seed": 1},
        {"id": "stop", **base, "detokenize": False, "stop": "a"},
        {"id": "odd", **base, "detokenize": "no"},
    ]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    main(["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(out)])
    by_id = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by_id["text"]["text"] and by_id["on"] == {**by_id["text"], "id": "on"}
    raw = by_id["raw"]
    assert (raw["token_ids"], raw["text"], raw["finish_reason"]) == (by_id["text"]["token_ids"], "", "length")
    assert [(len(o["token_ids"]), o["text"]) for o in by_id["rawn"]["outputs"]] == [(6, ""), (6, "")]
    assert all("detokenize" in by_id[i]["error"] for i in ("stop", "odd"))


def test_generate_serves_n_samples_of_a_line(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vLLM's SamplingParams.n (a vLLM user's way to draw several samples of one prompt) was
    refused as an unknown field: its samples now come back as ``outputs``, sample i drawn from
    seed + i as the gateway draws them."""
    base = {"adapter": "lora-0", "prompt": "kalo remi", "max_tokens": 5, "temperature": 1.0}
    lines = [
        {"id": "n", **base, "n": 3, "seed": 7},
        *({"id": f"s{s}", **base, "seed": s} for s in (7, 8, 9)),
        {"id": "greedy", "prompt_token_ids": [5, 6, 7], "max_tokens": 2, "n": 2, "prompt_logprobs": 0},
        {"id": "bad", "prompt": "x", "n": 0},
        {"id": "n", **base, "n": 2},  # a duplicate's samples are not served
        {"id": "one", "prompt_token_ids": [5, 6, 7], "max_tokens": 2, "n": None},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(out)]
    assert main([*argv, "--lora", f"lora-0={tiny_llama.adapters['lora-0']}"]) == 1
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["n", "s7", "s8", "s9", "greedy", "bad", "n@line-7", "one"]
    by_id = {r["id"]: r for r in results}
    assert [o["token_ids"] for o in by_id["n"]["outputs"]] == [by_id[f"s{s}"]["token_ids"] for s in (7, 8, 9)]
    assert all(o["finish_reason"] == "length" and "id" not in o for o in by_id["n"]["outputs"])
    greedy = by_id["greedy"]
    assert [o["token_ids"] for o in greedy["outputs"]] == [by_id["one"]["token_ids"]] * 2
    assert len(greedy["prompt_logprobs"]) == 2 and all("prompt_logprobs" not in o for o in greedy["outputs"])
    assert "n must be in [1, 128], got 0." in by_id["bad"]["error"]  # the gateway's words (BODY_RANGES)
    assert "duplicate id 'n'" in by_id["n@line-7"]["error"]


def test_generate_reads_seed_minus_one_as_no_seed(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vLLM's SamplingParams reads ``seed: -1`` as none (#4531), as the gateway does: two such lines
    drew the same text from seed -1, where two unseeded lines draw apart; seed 5 still repeats."""
    base = {"prompt": "kalo remi", "max_tokens": 12, "temperature": 1.0}
    lines = [{"id": f"{k}{i}", **base, "seed": s} for k, s in (("r", -1), ("s", 5)) for i in (0, 1)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["generate", "--model", str(tiny_llama.model), "--input", str(inp), "--output", str(out)]) == 0
    by_id = {r["id"]: r["token_ids"] for r in map(json.loads, out.read_text().splitlines())}
    assert by_id["r0"] != by_id["r1"] and by_id["s0"] == by_id["s1"]


def test_generate_serves_a_conversation_as_vllm_llm_chat(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vLLM's ``LLM.chat`` has no ``dlora generate`` line: ``messages`` was an unknown field. A
    line's conversation is now rendered by the model's chat template as the gateway renders it
    (transformers' ``apply_chat_template``), and served as those prompt ids would be."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama.model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if tools %}tools: {{ tools | length }}{% endif %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "system", "content": "kalo"}, {"role": "user", "content": "kalo remi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]

    def hf(**kwargs: object) -> list[int]:
        return tok.encode(tok.apply_chat_template(messages, tokenize=False, **kwargs), add_special_tokens=False)

    lines = [
        {"id": "chat", "messages": messages, "max_tokens": 6},
        {"id": "ids", "prompt_token_ids": hf(add_generation_prompt=True), "max_tokens": 6},
        {"id": "tools", "messages": messages, "tools": tools, "max_tokens": 6},
        {"id": "tool-ids", "prompt_token_ids": hf(add_generation_prompt=True, tools=tools), "max_tokens": 6},
        {"id": "both", "messages": messages, "prompt": "x"},
        {"id": "empty", "messages": []},
        {"id": "shape", "messages": "hi"},
        {"id": "alone", "prompt": "x", "tools": tools},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["generate", "--model", str(model), "--input", str(inp), "--output", str(out)]) == 1
    by_id = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by_id["chat"]["token_ids"] == by_id["ids"]["token_ids"] and len(by_id["chat"]["token_ids"]) == 6
    assert by_id["tools"]["token_ids"] == by_id["tool-ids"]["token_ids"]
    assert "exactly one of prompt, prompt_token_ids and messages" in by_id["both"]["error"]
    assert "messages must not be empty" in by_id["empty"]["error"] and "messages" in by_id["shape"]["error"]
    assert "tools is a conversation's: give messages" in by_id["alone"]["error"]


def test_generate_help_gives_the_line_format(capsys: pytest.CaptureFixture[str]) -> None:
    """--help said only "JSONL requests": what a line holds was in the README alone."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert all(f'"{key}"' in help_text for key in ("prompt_token_ids", "messages", "adapter", "outputs", "error"))


def test_the_readmes_demo_writes_its_output_where_git_ignores_it() -> None:
    """The demo wrote out.jsonl into the checkout's root, where `git status` then showed it."""
    root = Path(__file__).resolve().parents[2]
    # the command itself, not the phrase "on the demo model" (the README says it elsewhere too)
    readme = (root / "README.md").read_text()
    assert readme.count(command := "dlora generate --model .cache/demo/model") == 1
    demo = readme.split(command, 1)[1].split("```", 1)[0]
    output = demo.split("--output ", 1)[1].split()[0]
    ignored = [line.strip("/") for line in (root / ".gitignore").read_text().splitlines() if line.startswith("/")]
    assert any(output.startswith(folder + "/") for folder in ignored), output
    assert output.startswith(".cache/demo/")  # a folder the demo made
