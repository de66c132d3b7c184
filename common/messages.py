"""Every message that crosses a process boundary, as msgspec Structs. No logic beyond validation."""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How one request's tokens are chosen and when it stops (OpenAI / vLLM meanings)."""

    # Maximum new tokens to generate (counting tokens already produced before a resume).
    max_tokens: int = 16
    # 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    temperature: float = 0.0
    # Keep the smallest set of tokens whose probability sums to at least top_p (1.0 = all).
    top_p: float = 1.0
    # Keep only the k most likely tokens (0 or -1 = all).
    top_k: int = 0
    # Seed for this request's own random generator; None draws from the engine's.
    seed: int | None = None
    # Generation stops when one of these strings appears; it is cut from the output text.
    stop: list[str] = []
    # Generation stops after one of these token ids (it stays in the output tokens).
    stop_token_ids: list[int] = []
    # Keep generating past the model's end-of-sequence token (for benchmarks of exact lengths).
    ignore_eos: bool = False
    # Drop special tokens (BOS/EOS) from the output text.
    skip_special_tokens: bool = True

    def problem(self) -> str | None:
        """A human-readable reason these parameters are invalid, or None if they are fine."""
        if self.max_tokens < 1:
            return f"max_tokens must be >= 1, got {self.max_tokens}"
        if not 0.0 <= self.temperature <= 100.0:
            return f"temperature must be in [0, 100], got {self.temperature}"
        if not 0.0 < self.top_p <= 1.0:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k < -1:
            return f"top_k must be -1, 0 or positive, got {self.top_k}"
        if any(not s for s in self.stop):
            return "stop strings must not be empty"
        if any(t < 0 for t in self.stop_token_ids):
            return "stop_token_ids must be non-negative"
        return None
