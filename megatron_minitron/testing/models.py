"""Tiny model configs for tests and benchmarks."""

from megatron_minitron.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """4 layers, hidden 64, 4 heads in 2 query groups, SwiGLU 128, vocab 256."""
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, max_position_embeddings=128)
    base.update(overrides)
    return ModelConfig(**base)
