"""Tiny model configs for tests and benchmarks."""

from megatron_minitron.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """4 layers, hidden 64, 4 heads in 2 query groups, SwiGLU 128, vocab 256."""
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, max_position_embeddings=128)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_moe_config(**overrides) -> ModelConfig:
    """A Qwen2-MoE-like tiny model: 4 layers (MoE, dense, MoE, MoE), 6 experts of width 32
    with top-2 routing, a gated shared expert of width 48, dense MLP 96, hidden 64, 4 heads
    in 2 query groups, vocab 256, untied output layer."""
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, max_position_embeddings=128,
                tie_word_embeddings=False, num_moe_experts=6, moe_router_topk=2,
                moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48,
                moe_shared_expert_gate=True, moe_layer_freq=[1, 0, 1, 1])
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


def spread_weights(model, cfg: ModelConfig, seed: int = 0, sigma: float = 0.5) -> None:
    """Gives a randomly initialised model the uneven scales of a trained one, in place.

    mcore's initialisation makes every head, neuron, channel and layer alike, so their
    importance scores differ by little more than noise. Trained models are uneven; this draws
    log-normal gains (``exp(sigma * N(0, 1))``) for every norm channel, every query group's
    value rows, every query head (4× larger queries: attention as peaked as a trained model's),
    every MLP neuron (its fc1 rows; every expert's too), every router's expert rows (4× larger)
    and every layer's output projections, and a final norm about 6× larger (logits spread as a
    trained model's). Every rank draws the same gains, so use it at TP=1 (EP=1).
    """
    import torch

    from megatron_minitron import adapter

    generator = torch.Generator().manual_seed(seed)

    def gains(count):
        return torch.exp(sigma * torch.randn(count, generator=generator, dtype=torch.float64))

    with torch.no_grad():
        d, per_group = cfg.kv_channels, cfg.heads_per_group + 2
        for layer in adapter.decoder_layers(model):
            for norm in adapter.layer_norms(layer):
                norm.weight.mul_(gains(norm.weight.shape[0]).to(norm.weight.dtype))
            qkv = adapter.attention_qkv(layer).weight  # [groups * (hpg + 2) * d, h]
            rows = qkv.view(-1, per_group, d, qkv.shape[-1])
            rows[:, -1].mul_(gains(rows.shape[0]).to(qkv.dtype).view(-1, 1, 1))  # values
            queries = rows[:, :-2]  # [groups, hpg, d, h]: sharper or flatter attention per head
            queries.mul_(4 * gains(queries.shape[0] * queries.shape[1]).to(qkv.dtype)
                         .view(queries.shape[0], -1, 1, 1))
            for mlp in adapter.layer_mlps(layer):  # the dense MLP, or every expert
                fc1 = mlp.linear_fc1.weight  # [(2) * f, h]
                halves = fc1.view(2 if cfg.gated else 1, -1, fc1.shape[-1])
                halves.mul_(gains(halves.shape[1]).to(fc1.dtype).view(1, -1, 1))
            if adapter.is_moe_layer(layer):  # routers as decided as a trained model's
                router = adapter.moe_router(layer).weight
                router.mul_(4 * gains(router.shape[0]).to(router.dtype).view(-1, 1))
            layer_gain = float(gains(1))
            adapter.attention_output_projection(layer).weight.mul_(layer_gain)
            for mlp in adapter.layer_mlps(layer):
                mlp.linear_fc2.weight.mul_(layer_gain)
        norm = adapter.final_norm(model)
        if norm is not None:  # logits of a trained model's spread (std ~1, not ~0.15)
            norm.weight.mul_((6 * gains(norm.weight.shape[0])).to(norm.weight.dtype))


def save_realistic_checkpoint(path: str, tokenizer_dir=None, seed: int = 1234,
                              **overrides) -> ModelConfig:
    """As :func:`save_tiny_checkpoint`, with :func:`spread_weights` applied (fp32); returns
    the config."""
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint.io import save_checkpoint

    cfg = tiny_config(**overrides)
    with parallel.parallel_context(1, 1, seed=seed):
        model = adapter.build_gpt_model(cfg)
        spread_weights(model, cfg, seed)
        save_checkpoint(model, cfg, path, tokenizer_from=tokenizer_dir)
    return cfg


def save_bpe_tokenizer(folder: str, vocab_size: int = 300, files=(), texts=()) -> str:
    """Trains a byte-level BPE tokenizer (EOS ``<|endoftext|>``) on text ``files`` or, when
    none are given, on the strings ``texts``; saves it as a Hugging Face folder and returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    if files:
        tokenizer.train(list(files), trainer)
    else:
        tokenizer.train_from_iterator(list(texts), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                            eos_token="<|endoftext|>").save_pretrained(folder)
    return folder
