"""A deliberately plain Llama forward from our checkpoint's (TP=1) state dict: loops, no hooks,
no mcore. Tests compare the package's hooked scores against it."""

import math

import torch
import torch.nn.functional as F


def _norm(x, weight, bias, cfg):
    if cfg.normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * weight
    return F.layer_norm(x, x.shape[-1:], weight, bias, cfg.norm_epsilon)


def _rope(x, base):  # x [s, heads, d]; non-interleaved rotate-half (Llama / mcore)
    seq, _, dim = x.shape
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :].to(x.dtype)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def plain_forward(state, cfg, tokens):
    """Runs one sample ``tokens`` [s]; returns logits [s, v] and per-layer intermediates."""
    d, heads, groups = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    per_group = heads // groups
    x = state["embedding.word_embeddings.weight"][tokens]  # [s, h]
    seq = x.shape[0]
    record = {"attn": [], "fc1": [], "fc2_in": [], "norms": [], "layer_in": [], "layer_out": []}
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        record["layer_in"].append(x)
        h = _norm(x, state[p + "input_layernorm.weight"], state.get(p + "input_layernorm.bias"), cfg)
        record["norms"].append(h)
        qkv = h @ state[p + "self_attention.linear_qkv.weight"].T  # [s, groups*(per_group+2)*d]
        qkv = qkv.view(seq, groups, per_group + 2, d)
        q = qkv[:, :, :per_group].reshape(seq, heads, d)
        k, v = qkv[:, :, per_group], qkv[:, :, per_group + 1]  # [s, groups, d]
        q, k = _rope(q, cfg.rotary_base), _rope(k, cfg.rotary_base)
        outputs = []
        for head in range(heads):
            group = head // per_group
            scores = (q[:, head] @ k[:, group].T) / math.sqrt(d)
            probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
            outputs.append(probs @ v[:, group])  # [s, d]
        attn = torch.cat(outputs, -1)  # [s, heads*d]
        record["attn"].append(attn)
        x = x + attn @ state[p + "self_attention.linear_proj.weight"].T
        h = _norm(x, state[p + "pre_mlp_layernorm.weight"], state.get(p + "pre_mlp_layernorm.bias"),
                  cfg)
        record["norms"].append(h)
        fc1 = h @ state[p + "mlp.linear_fc1.weight"].T
        record["fc1"].append(fc1)
        if cfg.gated:
            gate, up = fc1.chunk(2, -1)
            act = F.silu(gate) * up
        else:
            act = F.gelu(fc1)
        record["fc2_in"].append(act)
        x = x + act @ state[p + "mlp.linear_fc2.weight"].T
        record["layer_out"].append(x)
    h = _norm(x, state["decoder.final_layernorm.weight"], state.get("decoder.final_layernorm.bias"),
              cfg)
    record["norms"].append(h)
    out_weight = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
    return h @ out_weight.T, record


def reduce_seq(values, how):  # [s] → scalar
    if how == "mean":
        return values.mean()
    if how == "l2":
        return values.pow(2).sum().sqrt()
    return values.var(unbiased=False)


def reduce_batch(values, how):  # [n] → scalar
    return reduce_seq(values, how)


def plain_scores(state, cfg, samples, batch_how, seq_how):
    """Scores by loops over samples, layers, heads, neurons and channels."""
    d, per_group = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    records = [plain_forward(state, cfg, sample)[1] for sample in samples]
    layers, heads, groups = cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups
    head = torch.zeros(layers, heads, dtype=torch.float64)
    group = torch.zeros(layers, groups, dtype=torch.float64)
    neuron = torch.zeros(layers, cfg.ffn_hidden_size, dtype=torch.float64)
    channel = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    for layer in range(layers):
        for h in range(heads):
            per_sample = [reduce_seq(r["attn"][layer][:, h * d:(h + 1) * d].norm(dim=-1), seq_how)
                          for r in records]
            head[layer, h] = reduce_batch(torch.stack(per_sample), batch_how)
        for g in range(groups):
            cols = slice(g * per_group * d, (g + 1) * per_group * d)
            per_sample = [reduce_seq(r["attn"][layer][:, cols].norm(dim=-1), seq_how)
                          for r in records]
            group[layer, g] = reduce_batch(torch.stack(per_sample), batch_how)
        for n in range(cfg.ffn_hidden_size):
            per_sample = [reduce_seq(r["fc2_in"][layer][:, n].abs(), seq_how) for r in records]
            neuron[layer, n] = reduce_batch(torch.stack(per_sample), batch_how)
    for norm_index in range(2 * layers + 1):
        for c in range(cfg.hidden_size):
            per_sample = [reduce_seq(r["norms"][norm_index][:, c].abs(), seq_how) for r in records]
            channel[c] += reduce_batch(torch.stack(per_sample), batch_how)
    bi = torch.zeros(layers, dtype=torch.float64)
    for layer in range(layers):
        cos = torch.cat([F.cosine_similarity(r["layer_in"][layer], r["layer_out"][layer], dim=-1)
                         for r in records])
        bi[layer] = 1 - cos.mean()
    return {"head": head, "query_group": group, "neuron": neuron, "channel": channel,
            "layer_bi": bi}
