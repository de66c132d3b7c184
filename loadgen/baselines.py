"""What a user without a LoRA server would run: transformers + peft, one adapter active at a time
(``set_adapter``), batching the queued requests of the head-of-line request's adapter into one
``generate`` call. Served in real time by the same open-loop harness as the engine."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dlora.loadgen.metrics import RequestResult
from dlora.loadgen.workload import RequestSpec, prompt_ids


class HFPeftServer:
    def __init__(
        self,
        model_dir: Path,
        adapters: dict[str, Path],
        max_batch: int = 32,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        names = sorted(adapters)
        self.model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()
        self.device = torch.device(device)
        self.vocab = base.config.vocab_size
        self.pad = base.config.pad_token_id or 0
        self.max_batch = max_batch

    @torch.inference_mode()
    def generate(self, adapter: str | None, prompts: list[list[int]], new_tokens: int) -> None:
        """One batched generate of exactly ``new_tokens`` tokens, prompts left-padded."""
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad,
        )
        if adapter is None:
            with self.model.disable_adapter():
                self.model.generate(**kwargs)
        else:
            self.model.set_adapter(adapter)
            self.model.generate(**kwargs)

    def serve(self, specs: list[RequestSpec], max_seconds: float) -> tuple[list[RequestResult], float]:
        results = [
            RequestResult(s.arrival_s, s.adapter, s.output_len, sent=True, prompt_len=s.prompt_len) for s in specs
        ]
        queue: list[int] = []
        nxt = 0
        start = time.perf_counter()
        while True:
            now = time.perf_counter() - start
            while nxt < len(specs) and specs[nxt].arrival_s <= now:
                queue.append(nxt)
                nxt += 1
            if now > max_seconds or (nxt == len(specs) and not queue):
                return results, now
            if not queue:
                time.sleep(max(0.0, min(specs[nxt].arrival_s - now, 0.05)))
                continue
            adapter = specs[queue[0]].adapter
            batch = [i for i in queue if specs[i].adapter == adapter][: self.max_batch]
            self.generate(
                adapter, [prompt_ids(i, specs[i], self.vocab) for i in batch], max(specs[i].output_len for i in batch)
            )
            end = time.perf_counter() - start
            for i in batch:  # no streaming: every token arrives when the batch returns
                r = results[i]
                r.first_token_s = r.finish_s = end
                r.tokens = specs[i].output_len
                queue.remove(i)
