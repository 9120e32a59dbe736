"""megatron_minitron: turn one trained Megatron-Core LLM into a family of smaller ones."""

__version__ = "0.1.0"
