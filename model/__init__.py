"""What every process knows about the base model and its adapters, below all services: the
model's architecture and projection targets (``config``), PEFT adapters read and validated
against it without torch (``adapters``). The gateway, dispatcher and migrator import only this;
the worker's engine builds on it."""
