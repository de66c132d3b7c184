"""``dlora generate``: serve a JSONL file of requests through the engine, write one result per line.

Input line: ``{"id", "adapter": NAME or null, "prompt" or "prompt_token_ids" or "messages", "max_tokens",
"temperature", ...}`` (any SamplingParams field, and vLLM's ``detokenize``: false leaves the text
empty; the engine still makes it, unread). Output line, in input order:
``{"id", "token_ids", "text", "finish_reason", "stop_reason"}`` (and ``"logprobs"`` /
``"prompt_logprobs"`` when asked; with ``max_tokens`` 0 the prompt's alone, as the completions
API's echo gives them), or
``{"id", "error"}`` for a line that could not be served; the other lines are served all the same.
A line of ``n`` > 1: ``{"id", "outputs": [...], "prompt_logprobs"}``, a result as above per sample.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import msgspec

from dlora.common import integers
from dlora.common.messages import SamplingParams
from dlora.common.sampling import BODY_RANGES, NULLABLE
from dlora.common.undecodable import holds_lone_surrogate
from dlora.model.adapters import AdapterError, parse_lora_args
from dlora.services.gateway.chat_template import ChatTemplate, chat_prompt_ids
from dlora.services.gateway.openai import APIError, ChatMessage
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.engine.engine import LLMEngine, RequestError
from dlora.services.worker.engine.structured import GrammarUnavailable
from dlora.services.worker.policy import PolicyConfig

_CHAT_KEYS = {
    "messages",
    "tools",
    "documents",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
}
_REQUEST_KEYS = {"id", "adapter", "prompt", "prompt_token_ids", "n", "detokenize", *_CHAT_KEYS}
# --mode names the batching policy: one fixed mode, or dLoRA's dynamic choice.
MODES = {"merged": "merged-only", "unmerged": "unmerged-only", "mixed": "mixed-only", "dlora": "dlora"}


def _as_vllm_reads(fields: dict[str, Any], prompt_tokens: int, context: int) -> None:
    """Take the shapes vLLM's SamplingParams takes, which a vLLM user's line carries over and the
    gateway takes too: a lone ``stop`` string, null for a list left unset, ``max_tokens`` null:
    the context the prompt leaves, as vLLM's ``LLM`` fills it (a prompt that leaves none keeps 1,
    and is refused as too long), and ``seed`` -1: no seed (vLLM's ``SamplingParams.__post_init__``,
    #4531), as the gateway reads it."""
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    for name in NULLABLE:
        if name in fields and fields[name] is None:
            del fields[name]
    if "max_tokens" in fields and fields["max_tokens"] is None:
        fields["max_tokens"] = max(context - prompt_tokens, 1)
    if type(fields.get("seed")) is int and fields["seed"] == -1:
        del fields["seed"]


class _Chat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A line's conversation, as vLLM's ``LLM.chat`` takes one: rendered by the model's chat
    template as the gateway renders a chat request's."""

    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, str]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None  # (ChatTemplate.of reads it; a line cannot set it)


def _chat_ids(engine: LLMEngine, obj: dict[str, Any]) -> list[int]:
    """The prompt ids of a line that gives ``messages``.

    Raises:
        RequestError: a prompt given too, or a conversation the template refuses (its reason).
        msgspec.ValidationError: a field of the wrong shape."""
    if obj.get("messages") is None:
        given = next(k for k in sorted(_CHAT_KEYS) if obj.get(k) is not None)
        raise RequestError(f"{given} is a conversation's: give messages")
    if obj.get("prompt") is not None or obj.get("prompt_token_ids") is not None:
        raise RequestError("give exactly one of prompt, prompt_token_ids and messages")
    chat = msgspec.convert({k: obj[k] for k in _CHAT_KEYS if obj.get(k) is not None}, _Chat)
    try:
        return chat_prompt_ids(chat.messages, engine.tokenizer, ChatTemplate.of(chat))
    except APIError as e:
        raise RequestError(e.message) from None


def _nth_seed(seed: int, i: int) -> int:
    """Sample ``i``'s seed: ``seed + i`` wrapped within a signed 64-bit seed, as the gateway draws
    a request's ``n`` samples."""
    return (seed + i + (1 << 63)) % (1 << 64) - (1 << 63)


def _submit(
    engine: LLMEngine, key: str, lineno: int, line: str, textless: set[str]
) -> tuple[str, str | None, bool, int]:
    """Queue one line under ``key`` (the engine's id for it: its line's, so that no id a line
    gives can meet another's), sample i of its ``n`` after the first under ``key/i``; returns (the
    line's id, error or None, whether it asks for its prompt's logprobs alone: ``max_tokens`` 0,
    run for one token that is not shown, as the gateway's echo runs it, and its ``n``). ``key``
    joins ``textless`` for a line of vLLM's ``detokenize`` false: its text is left empty."""
    try:
        line.encode()
    except UnicodeEncodeError as e:  # a byte that is not UTF-8, kept by ``read_lines`` as a surrogate
        return (
            key,
            f"line {lineno}: not UTF-8 text (byte 0x{ord(line[e.start]) - 0xDC00:02x} at column {e.start + 1})",
            False,
            1,
        )
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as e:
        return key, f"line {lineno}: not valid JSON ({e.msg})", False, 1
    except RecursionError:
        return key, f"line {lineno}: not valid JSON (nested too deeply)", False, 1
    if not isinstance(obj, dict):
        return key, f"line {lineno}: expected a JSON object", False, 1
    rid = key if obj.get("id") is None else str(obj["id"])
    if holds_lone_surrogate(obj):
        return rid, f"line {lineno}: a string holds a lone UTF-16 surrogate escape (not text)", False, 1
    samples = 1
    try:
        fields = {k: v for k, v in obj.items() if k not in _REQUEST_KEYS}
        # 16.0 is 16 wherever an int is wanted, as vLLM's run_batch (pydantic, lax) and the gateway read it
        fields = integers.with_whole_numbers(fields, SamplingParams) or fields
        asked = 1 if obj.get("n") is None else integers.whole("n", obj["n"])  # vLLM's SamplingParams.n: null is 1
        if (why := BODY_RANGES["n"].problem("n", asked)) is not None:
            raise RequestError(why)
        samples = asked
        if type(detokenize := obj.get("detokenize", True)) is not bool:
            raise RequestError(f"detokenize must be true or false, got {json.dumps(detokenize)}")
        if not detokenize and fields.get("stop"):  # as vLLM refuses them: a stop string is looked for in the text
            raise RequestError("stop strings need the text: give detokenize true to use stop")
        prompt, ids, adapter = obj.get("prompt"), obj.get("prompt_token_ids"), obj.get("adapter")
        if any(obj.get(k) is not None for k in _CHAT_KEYS):
            ids = _chat_ids(engine, obj)
        size = len(ids) if isinstance(ids, list) else 0  # the prompt's, needed here only to fill the context
        if isinstance(prompt, str) and "max_tokens" in fields and fields["max_tokens"] is None:
            size = len(engine.tokenizer.encode(prompt))
        _as_vllm_reads(fields, size, engine.max_model_len)
        prompt_only = fields.get("max_tokens") == 0 and fields.get("prompt_logprobs") is not None
        if prompt_only:
            if type(fields["max_tokens"]) is not int or fields.get("min_tokens"):  # as the gateway refuses them
                raise RequestError("max_tokens 0 asks for the prompt's logprobs alone: an integer, with no min_tokens")
            fields["max_tokens"] = 1
        # json.loads reads NaN and Infinity, which msgspec would write as null ("expected float, got null")
        if bad := next(((k, v) for k, v in fields.items() if isinstance(v, float) and not math.isfinite(v)), None):
            raise RequestError(f"{bad[0]} must be a finite number, got {bad[1]}")
        # Through JSON, not convert: logit_bias's keys are token ids written as JSON's strings.
        params = msgspec.json.decode(msgspec.json.encode(fields), type=SamplingParams)
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError("prompt must be a string")
        if ids is not None and not isinstance(ids, list):
            raise RequestError("prompt_token_ids must be a list of integers")
        if ids is not None:
            ids = [integers.whole("prompt_token_ids", t) for t in ids]  # no bools; 5.0 is 5
        if adapter is not None and not isinstance(adapter, str):
            raise RequestError("adapter must be a string or null")
        engine.add_request(key, prompt=prompt, prompt_token_ids=ids, params=params, adapter=adapter)
        if (n := len(engine.seqs[key].prompt_ids)) + params.max_tokens > engine.max_model_len:
            engine.abort(key)  # as the gateway refuses it: nothing is cut short without a word
            raise RequestError(
                f"the prompt's {n} tokens and max_tokens={params.max_tokens} exceed the context of "
                f"{engine.max_model_len}"
            )
        for i in range(1, samples):  # each its own request, as the gateway serves n; the prefix cache shares the prompt
            seed = None if params.seed is None else _nth_seed(params.seed, i)
            ids = engine.seqs[key].prompt_ids
            sample = msgspec.structs.replace(params, seed=seed)
            engine.add_request(f"{key}/{i}", prompt_token_ids=ids, params=sample, adapter=adapter)
    except (msgspec.ValidationError, RequestError, GrammarUnavailable, integers.NotWhole) as e:
        for k in (key, *(f"{key}/{i}" for i in range(1, samples))):  # none of a refused line's samples runs
            if k in engine.seqs:
                engine.abort(k)
        return rid, f"line {lineno}: {e}", False, 1
    except RecursionError:  # JSON deep enough for json.loads, not for what reads it after
        return rid, f"line {lineno}: nested too deeply", False, 1
    if not detokenize:
        textless.add(key)
    return rid, None, prompt_only, samples


def read_lines(path: str) -> list[str]:
    """``path``'s JSONL lines: split at newlines alone (a JSON string may hold U+2028, which
    ``str.splitlines`` splits at), a CR before one dropped; a byte that is not UTF-8 kept as a
    lone surrogate (``surrogateescape``), so that its line alone is refused (``_submit``).
    Raises OSError."""
    # (a BOM, as Windows editors write one, is not line 1's: json refused it there)
    text = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and not lines[-1] else lines


def generate_lines(engine: LLMEngine, lines: list[str]) -> list[dict[str, Any]]:
    """Serve every non-blank line; results in input order, each under its line's id (a second line
    of an id already given is an error: ids name lines). A line of ``n`` > 1 gets its samples as
    ``outputs``, as vLLM's RequestOutput holds them."""
    results: dict[str, dict[str, Any]] = {}  # by engine key: each line's own, and each later sample's
    prompt_only: set[str] = set()
    given: set[str] = set()
    samples_of: dict[str, list[str]] = {}  # a line of n > 1's key: its samples' keys
    textless: set[str] = set()  # the keys of lines of detokenize false
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key = f"line-{lineno}"
        rid, error, alone, samples = _submit(engine, key, lineno, line, textless)
        keys = [key, *(f"{key}/{i}" for i in range(1, samples))]
        if rid in given:
            if error is None:
                for k in keys:
                    engine.abort(k)
            rid, error = f"{rid}@line-{lineno}", error or f"line {lineno}: duplicate id {rid!r}"
        given.add(rid)
        if error:
            results[key] = {"id": rid, "error": error}
            continue
        if samples > 1:
            samples_of[key] = keys
        for k in keys:
            if alone:
                prompt_only.add(k)
            results[k] = {"id": rid, "token_ids": [], "text": ""}
            if (params := engine.seqs[k].params).prompt_logprobs is not None:  # a one-token prompt's: []
                results[k]["prompt_logprobs"] = []
            if params.logprobs is not None:
                results[k]["logprobs"] = []
    while engine.has_unfinished():
        for out in engine.step():
            r = results[out.request_id]
            if out.error is not None:
                results[out.request_id] = {"id": r["id"], "error": out.error}
                continue
            if out.request_id not in prompt_only:
                r["token_ids"] += out.new_token_ids
                r["text"] += "" if out.request_id.partition("/")[0] in textless else out.new_text
                if out.logprobs:  # [token id, logprob, [[alternative, logprob], ...]] per token
                    r["logprobs"] += msgspec.to_builtins(out.logprobs)
            if out.prompt_logprobs:  # the same per prompt token after the first
                r["prompt_logprobs"] = msgspec.to_builtins(out.prompt_logprobs)
            if out.finished and out.request_id in prompt_only:
                r["finish_reason"], r["stop_reason"] = "length", None
            elif out.finished:
                r["finish_reason"] = out.finish_reason.value if out.finish_reason else None
                r["stop_reason"] = out.stop_reason
    for key, keys in samples_of.items():
        outputs = [results.pop(k) for k in keys[1:]]
        first = results[key]
        if failed := next((r for r in [first, *outputs] if "error" in r), None):
            results[key] = {"id": first["id"], "error": failed["error"]}
            continue
        outputs.insert(0, first)
        results[key] = {"id": first["id"], "outputs": outputs}
        if "prompt_logprobs" in first:  # the prompt's, once
            results[key]["prompt_logprobs"] = first["prompt_logprobs"]
        for r in outputs:
            del r["id"]
            r.pop("prompt_logprobs", None)
    return list(results.values())


class Output:
    """Where ``dlora generate`` writes its lines: a file beside ``path`` put in its place by
    ``commit`` (opened "w" up front, a Ctrl-C emptied it and the lines already served were lost
    with it), with the mode of the file it replaces (or open()'s for a new one). A link's target is
    written, not the link; what is not a regular file (a FIFO, ``/dev/stdout``), or sits in a
    folder that takes no new file, is written directly, as before (a review).

    Raises:
        IsADirectoryError, PermissionError, OSError: ``path`` cannot be written."""

    def __init__(self, path: str) -> None:
        target = Path(path)
        if target.is_dir():
            raise IsADirectoryError(f"--output {path} is a folder")
        self.target = target.resolve() if target.is_symlink() else target
        self.temp: Path | None = None
        self.file: IO[str]
        if self.target.exists() and (not self.target.is_file() or not os.access(self.target, os.W_OK)):
            self.file = open(self.target, "w")  # (and a read-only file refused now, as open() refuses it)
            return
        try:
            temp = tempfile.NamedTemporaryFile(
                "w", dir=self.target.parent, prefix=f".{self.target.name}.", delete=False
            )
        except PermissionError:
            self.file = open(self.target, "w")
            return
        self.file, self.temp = temp, Path(temp.name)
        os.chmod(self.temp, self.target.stat().st_mode & 0o7777 if self.target.exists() else _new_file_mode())

    def commit(self) -> None:
        self.file.close()
        if self.temp is not None:
            os.replace(self.temp, self.target)

    def abandon(self) -> None:
        self.file.close()
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)


def _new_file_mode() -> int:
    """The mode open() gives a new file (0666 less the umask), not tempfile's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_generate(args: argparse.Namespace) -> int:
    try:
        loras = parse_lora_args(args.lora)
        engine = LLMEngine(
            args.model,
            EngineConfig(
                dtype=args.dtype,
                device=args.device,
                policy=PolicyConfig(name=MODES[args.mode]),
                max_loras=args.max_loras,
            ),
        )
        for name, path in loras.items():
            engine.register_adapter(name, path)
        lines = read_lines(args.input)
        out = Output(args.output)  # before the batch runs: a bad path must not cost the work
    except (ValueError, AdapterError, OSError) as e:
        print(f"dlora generate: {e}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _terminated)  # as Ctrl-C: the output left as it was
    try:
        results = generate_lines(engine, lines)
        for r in results:
            out.file.write(json.dumps(r) + "\n")
        out.commit()
    except BaseException as e:
        out.abandon()
        if isinstance(e, KeyboardInterrupt):
            print(f"dlora generate: interrupted; {args.output} left as it was", file=sys.stderr)
            return 130
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = sum("error" in r for r in results)
    for r in results:
        if "error" in r:
            print(f"dlora generate: {r['error']}", file=sys.stderr)
    print(f"dlora generate: {len(results) - failed} served, {failed} failed -> {args.output}", file=sys.stderr)
    return 1 if failed else 0
