"""Tiny model configs for tests and benchmarks."""

from megatron_minitron.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """4 layers, hidden 64, 4 heads in 2 query groups, SwiGLU 128, vocab 256."""
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, max_position_embeddings=128)
    base.update(overrides)
    return ModelConfig(**base)


def save_tiny_checkpoint(path: str, tokenizer_dir=None, seed: int = 1234, **overrides) -> None:
    """Builds ``tiny_config(**overrides)`` with mcore's initialisation and saves it (with the
    tokenizer) as a checkpoint; runs in a spawned rank or a plain process."""
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint.io import save_checkpoint

    cfg = tiny_config(**overrides)
    with parallel.parallel_context(1, 1, seed=seed):
        save_checkpoint(adapter.build_gpt_model(cfg), cfg, path, tokenizer_from=tokenizer_dir)
