"""Compute kernels the engine calls per layer: paged attention and LoRA shrink/expand.

Each op has a torch implementation (the reference, and the CPU path); Triton implementations
plug in behind the same functions on CUDA.
"""
