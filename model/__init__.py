"""What every process knows about the base model and its adapters, below all services: the
model's architecture and projection targets (``config``), PEFT adapters read and validated
against it without torch (``adapters``), and the demo-model maker (``make_tiny``: random
Llama-family models and PEFT adapters; it alone needs torch, imported by who calls it). The
gateway, dispatcher and migrator import only the torch-free modules; the worker's engine builds
on them."""
