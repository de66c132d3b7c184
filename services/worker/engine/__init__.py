"""The worker's inference engine: model, paged KV cache, continuous batching, merged and unmerged LoRA."""

from dlora.services.worker.engine.engine import EngineConfig, LLMEngine, RequestError, RequestOutput

__all__ = ["EngineConfig", "LLMEngine", "RequestError", "RequestOutput"]
