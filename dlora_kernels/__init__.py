"""Compute kernels the engine calls per layer: paged attention and LoRA shrink/expand.

Each op has a torch implementation (the reference, and the CPU path) and a Triton one beside it
(``*_triton.py``); ``backend.select_kernels`` gives the engine one of the two, Triton on CUDA.
"""
