"""``dlora generate``: serve a JSONL file of requests through the engine, write one result per line.

Input line: ``{"id", "adapter": NAME or null, "prompt" or "prompt_token_ids", "max_tokens",
"temperature", ...}`` (any SamplingParams field). Output line, in input order:
``{"id", "token_ids", "text", "finish_reason", "stop_reason"}`` (and ``"prompt_logprobs"`` when
asked; with ``max_tokens`` 0 those alone, as the completions API's echo gives them), or
``{"id", "error"}`` for a line that could not be served; the other lines are served all the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from dlora.common.messages import SamplingParams
from dlora.model.adapters import AdapterError, parse_lora_args
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.engine.engine import LLMEngine, RequestError
from dlora.services.worker.policy import PolicyConfig

_REQUEST_KEYS = {"id", "adapter", "prompt", "prompt_token_ids"}
# --mode names the batching policy: one fixed mode, or dLoRA's dynamic choice.
MODES = {"merged": "merged-only", "unmerged": "unmerged-only", "mixed": "mixed-only", "dlora": "dlora"}


def _submit(engine: LLMEngine, lineno: int, line: str) -> tuple[str, str | None, bool]:
    """Queue one line; returns (id, error or None, whether it asks for its prompt's logprobs alone:
    ``max_tokens`` 0, run for one token that is not shown, as the gateway's echo runs it)."""
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as e:
        return f"line-{lineno}", f"line {lineno}: not valid JSON ({e.msg})", False
    if not isinstance(obj, dict):
        return f"line-{lineno}", f"line {lineno}: expected a JSON object", False
    rid = str(obj.get("id", f"line-{lineno}"))
    try:
        fields = {k: v for k, v in obj.items() if k not in _REQUEST_KEYS}
        prompt_only = fields.get("max_tokens") == 0 and fields.get("prompt_logprobs") is not None
        if prompt_only:
            fields["max_tokens"] = 1
        # Through JSON, not convert: logit_bias's keys are token ids written as JSON's strings.
        params = msgspec.json.decode(msgspec.json.encode(fields), type=SamplingParams)
        prompt = obj.get("prompt")
        ids = obj.get("prompt_token_ids")
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError("prompt must be a string")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
            raise RequestError("prompt_token_ids must be a list of integers")
        engine.add_request(rid, prompt=prompt, prompt_token_ids=ids, params=params, adapter=obj.get("adapter"))
        if (n := len(engine.seqs[rid].prompt_ids)) + params.max_tokens > engine.max_model_len:
            engine.abort(rid)  # as the gateway refuses it: nothing is cut short without a word
            raise RequestError(
                f"the prompt's {n} tokens and max_tokens={params.max_tokens} exceed the context of "
                f"{engine.max_model_len}"
            )
    except (msgspec.ValidationError, RequestError) as e:
        return rid, f"line {lineno}: {e}", False
    return rid, None, prompt_only


def generate_lines(engine: LLMEngine, lines: list[str]) -> list[dict[str, Any]]:
    """Serve every non-blank line; results in input order."""
    order: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    prompt_only: set[str] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rid, error, alone = _submit(engine, lineno, line)
        if alone:
            prompt_only.add(rid)
        if rid in results:
            rid, error = f"{rid}@line-{lineno}", error or f"line {lineno}: duplicate id {rid!r}"
        order.append(rid)
        results[rid] = {"id": rid, "error": error} if error else {"id": rid, "token_ids": [], "text": ""}
        if not error and engine.seqs[rid].params.prompt_logprobs is not None:  # a one-token prompt's: []
            results[rid]["prompt_logprobs"] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                results[out.request_id] = {"id": out.request_id, "error": out.error}
                continue
            r = results[out.request_id]
            if out.request_id not in prompt_only:
                r["token_ids"] += out.new_token_ids
                r["text"] += out.new_text
            if (
                out.prompt_logprobs
            ):  # [token id, logprob, [[alternative, logprob], ...]] per prompt token after the first
                r["prompt_logprobs"] = msgspec.to_builtins(out.prompt_logprobs)
            if out.finished and out.request_id in prompt_only:
                r["finish_reason"], r["stop_reason"] = "length", None
            elif out.finished:
                r["finish_reason"] = out.finish_reason.value if out.finish_reason else None
                r["stop_reason"] = out.stop_reason
    return [results[rid] for rid in order]


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
        lines = Path(args.input).read_text().splitlines()
        out = open(args.output, "w")  # opened before the batch runs: a bad path must not cost the work
    except (ValueError, AdapterError, OSError) as e:
        print(f"dlora generate: {e}", file=sys.stderr)
        return 2
    results = generate_lines(engine, lines)
    with out:
        for r in results:
            out.write(json.dumps(r) + "\n")
    failed = sum("error" in r for r in results)
    for r in results:
        if "error" in r:
            print(f"dlora generate: {r['error']}", file=sys.stderr)
    print(f"dlora generate: {len(results) - failed} served, {failed} failed -> {args.output}", file=sys.stderr)
    return 1 if failed else 0
