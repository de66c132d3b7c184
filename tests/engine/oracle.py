"""The oracle: transformers + peft, one request at a time, greedy."""

from __future__ import annotations

from functools import cached_property

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dlora.model.make_tiny import TinyOutput


class Oracle:
    def __init__(self, tiny: TinyOutput) -> None:
        self.tiny = tiny

    @cached_property
    def model(self) -> PeftModel:
        base = AutoModelForCausalLM.from_pretrained(self.tiny.model, dtype=torch.float32)
        names = sorted(self.tiny.adapters)
        peft = PeftModel.from_pretrained(base, self.tiny.adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(self.tiny.adapters[name], adapter_name=name)
        peft.eval()
        return peft

    def _run(self, adapter: str | None, fn):
        if adapter is None:
            with self.model.disable_adapter():
                return fn()
        self.model.set_adapter(adapter)
        return fn()

    @torch.inference_mode()
    def generate(self, adapter: str | None, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
        """Greedy tokens; ``kwargs`` go to ``generate`` (``repetition_penalty``, ...;
        ``eos_token_id=None`` for a request with ``ignore_eos``: past the model's EOS, as it)."""
        ids = torch.tensor([prompt_ids])
        out = self._run(
            adapter,
            lambda: self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **kwargs,
            ),
        )
        return out[0, len(prompt_ids) :].tolist()

    @torch.inference_mode()
    def last_logits(self, adapter: str | None, prompt_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt_ids])
        return self._run(adapter, lambda: self.model(input_ids=ids).logits[0, -1].float())

    @torch.inference_mode()
    def all_logits(self, adapter: str | None, prompt_ids: list[int]) -> torch.Tensor:
        """(n, vocab) logits at every position of ``prompt_ids``."""
        ids = torch.tensor([prompt_ids])
        return self._run(adapter, lambda: self.model(input_ids=ids).logits[0].float())
