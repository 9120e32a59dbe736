"""Hugging Face import/export: logits parity with transformers at TP=1 and TP>1, exact
HF -> mcore -> HF round trips, and one-line errors for bad inputs.

Tiny random Llama/Qwen2 models always run; the SmolLM2-135M tests use the cached GGUF asset.
"""

import json
import logging
import os

import pytest
import torch

from megatron_minitron import cli, parallel
from megatron_minitron.checkpoint.io import load_checkpoint, load_config
from megatron_minitron.errors import UsageError
from megatron_minitron.hf import export_hf, import_hf
from megatron_minitron.hf.convert import dtype_kwarg
from megatron_minitron.hf.mapping import fuse_qkv, split_qkv
from megatron_minitron.model.forward import full_logits
from megatron_minitron.testing import spawn, tiny_config

transformers = pytest.importorskip("transformers")

TINY = {
    "llama_tied": dict(arch="llama", tie=True, head_dim=16),
    "llama_untied_head_dim_24": dict(arch="llama", tie=False, head_dim=24),
    "qwen2_qkv_bias": dict(arch="qwen2", tie=False, head_dim=16),
    "mistral_no_window": dict(arch="mistral", tie=False, head_dim=16),
}
TINY_VOCAB = 256
PROSE = [
    "The kernel keeps a list of every process that is waiting for a lock. When the lock is "
    "released, the first process on the list is woken up and allowed to run, while the others "
    "remain asleep until their turn comes. This simple rule keeps the system fair, but it can "
    "make a busy machine feel slow when many programs compete for the same resource at once.",
    "Early in the morning the fishermen pushed their boats into the grey water and rowed out "
    "past the harbour wall. By noon the wind had turned, and the small fleet came back with "
    "nets full of herring, which the women of the village cleaned and salted before the long "
    "evening meal. Nobody in the village could remember a better catch in twenty years.",
]
SMOL_SEQ = 64


# ---------------------------------------------------------------- helpers


def _tiny_tokenizer(folder, size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0",
                                                bos_token="w1", eos_token="w2")
    fast.save_pretrained(folder)


def _tiny_hf(folder, arch="llama", tie=True, head_dim=16, tokenizer_size=200, seed=0):
    """Saves a random 2-layer GQA model (4 heads, 2 groups) with a word-level tokenizer."""
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  vocab_size=TINY_VOCAB, max_position_embeddings=128, rope_theta=5000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(sliding_window=None, **kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    with torch.no_grad():  # random norms and biases too, so every tensor's mapping is tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    _tiny_tokenizer(folder, tokenizer_size)
    return model.eval()


def _load_hf(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, **dtype_kwarg(torch.float32), **kwargs).eval()


def _mcore_logits_tp1(ckpt, tokens):
    with parallel.parallel_context(1, 1):
        model, _ = load_checkpoint(ckpt)
        return full_logits(model, tokens)


def _logits_at_layout(jobs, tp):
    """Spawned on every rank: ``jobs`` is a list of (checkpoint, tokens file, logits file)."""
    parallel.initialize(tp, 1)
    for ckpt, tokens_file, logits_file in jobs:
        model, _ = load_checkpoint(ckpt)
        logits = full_logits(model, torch.load(tokens_file))
        if parallel.is_rank0():
            torch.save(logits, logits_file)


def _logits_at_tp(root, named_jobs, tp):
    """{name: logits [n, s, v]} at TP=``tp`` for {name: (ckpt, tokens)}, in one spawn."""
    jobs = []
    for name, (ckpt, tokens) in named_jobs.items():
        tokens_file = str(root / f"{name}.tokens.pt")
        logits_file = str(root / f"{name}.tp{tp}.pt")
        torch.save(tokens, tokens_file)
        jobs.append((ckpt, tokens_file, logits_file))
    spawn(_logits_at_layout, tp, jobs, tp)
    return {name: torch.load(job[2]) for name, job in zip(named_jobs, jobs)}


def _run_cli(argv):
    """``cli.main(argv)``, then drops the log handler it binds to this test's captured stderr."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        return cli.main(argv)
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)


def _assert_same_state(expected, actual):
    assert sorted(expected) == sorted(actual)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


# ---------------------------------------------------------------- tiny models


def test_qkv_fuse_split_inverse():
    cfg = tiny_config(num_attention_heads=6, num_query_groups=2, kv_channels=8)
    q, k, v = torch.randn(48, 10), torch.randn(16, 10), torch.randn(16, 10)
    fused = fuse_qkv(q, k, v, cfg)  # [2 groups * (3 + 2) heads * 8, 10]
    assert fused.shape == (80, 10)
    assert torch.equal(fused[24:32], k[:8]) and torch.equal(fused[64:72], k[8:])
    for got, want in zip(split_qkv(fused, cfg), (q, k, v)):
        assert torch.equal(got, want)


def imported_variants(root, variants, make, vocab):
    """{variant: dict(hf, ckpt, model, tokens, logits, root)}: each HF model made by
    ``make(folder, **spec)``, imported once, with its logits on two random sequences."""
    out = {}
    for name, spec in variants.items():
        hf_dir, ckpt = str(root / name / "hf"), str(root / name / "ckpt")
        model = make(hf_dir, **spec)
        import_hf(hf_dir, ckpt)
        tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(tokens).logits  # [2, 24, vocab]
        out[name] = dict(hf=hf_dir, ckpt=ckpt, model=model, tokens=tokens, logits=logits,
                         root=root)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: dict(hf, ckpt, model, tokens, logits)} with each variant imported once."""
    return imported_variants(tmp_path_factory.mktemp("tiny_hf"), TINY, _tiny_hf, TINY_VOCAB)


@pytest.mark.parametrize("variant", list(TINY))
def test_tiny_config_and_tp1_logits(tiny, variant):
    case, spec = tiny[variant], TINY[variant]
    cfg = load_config(case["ckpt"])
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (
        4, 2, spec["head_dim"])
    assert cfg.tie_word_embeddings == spec["tie"]
    assert cfg.add_qkv_bias == (spec["arch"] == "qwen2")
    assert (cfg.rotary_base, cfg.norm_epsilon, cfg.vocab_size) == (5000.0, 1e-6, TINY_VOCAB)
    logits = _mcore_logits_tp1(case["ckpt"], case["tokens"])
    assert (logits - case["logits"]).abs().max().item() <= 1e-4


def test_tiny_tp2_logits(tiny):
    root = next(iter(tiny.values()))["root"]
    jobs = {name: (case["ckpt"], case["tokens"]) for name, case in tiny.items()}
    got = _logits_at_tp(root, jobs, 2)
    for name, case in tiny.items():
        assert (got[name] - case["logits"]).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("variant", list(TINY))
def test_tiny_round_trip(tiny, variant, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = tiny[variant]
    out = str(tmp_path / "exported")
    export_hf(case["ckpt"], out)
    config = json.load(open(os.path.join(out, "config.json")))
    expected_arch = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
        TINY[variant]["arch"], "LlamaForCausalLM")
    assert config["architectures"] == [expected_arch]
    reloaded = _load_hf(out)
    _assert_same_state(case["model"].state_dict(), reloaded.state_dict())
    exported = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    source = transformers.AutoTokenizer.from_pretrained(case["hf"], local_files_only=True)
    assert exported.get_vocab() == source.get_vocab()


def test_tiny_export_bf16_sharded(tiny, tmp_path):
    case = tiny["llama_untied_head_dim_24"]
    out = str(tmp_path / "sharded")
    export_hf(case["ckpt"], out, dtype=torch.bfloat16, max_shard_bytes=40_000)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, **dtype_kwarg(torch.bfloat16))
    expected = {k: v.to(torch.bfloat16) for k, v in case["model"].state_dict().items()}
    _assert_same_state(expected, reloaded.state_dict())


def test_export_refuses_non_empty_output(tiny, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match=f"--output {out} exists and is not empty"):
        export_hf(tiny["llama_tied"]["ckpt"], str(out))
    assert os.listdir(out) == ["notes.txt"]
    with pytest.raises(UsageError, match="--load .* does not exist"):
        export_hf(str(tmp_path / "nowhere"), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- bad inputs


def _assert_one_line_error(call, value, output):
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and str(value) in message, message
    assert not os.path.exists(output) and not os.path.exists(f"{output}.tmp")
    return message


def _write_config(folder, **fields):
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                rms_norm_eps=1e-6, hidden_act="silu")
    base.update(fields)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(base, handle)


def test_import_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    out = str(tmp_path / "ckpt")
    _assert_one_line_error(lambda: import_hf(str(missing), out), missing, out)
    _assert_one_line_error(lambda: import_hf(str(tmp_path), out, gguf_file="x.gguf"), "x.gguf",
                           out)


@pytest.mark.parametrize("fields,value", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "GPT2LMHeadModel"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=64)),
     "original_max_position_embeddings=64"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=32),
     "sliding_window=32"),
    (dict(hidden_act="gelu"), "gelu"),
    (dict(num_local_experts=8), "num_local_experts=8"),  # experts on a dense family
])
def test_import_unsupported_config(tmp_path, fields, value):
    src, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    _write_config(src, **fields)
    _assert_one_line_error(lambda: import_hf(src, out), value, out)


def test_import_tokenizer_larger_than_vocab(tmp_path):
    src, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    _tiny_hf(src, tokenizer_size=TINY_VOCAB + 44)
    message = _assert_one_line_error(lambda: import_hf(src, out), TINY_VOCAB + 44, out)
    assert f"vocab_size is {TINY_VOCAB}" in message


def test_import_refuses_foreign_output(tmp_path):
    src, out = str(tmp_path / "hf"), tmp_path / "taken"
    _write_config(src)
    out.mkdir()
    (out / "data.bin").write_bytes(b"precious")
    with pytest.raises(UsageError, match=f"--output {out} exists and is not"):
        import_hf(src, str(out))
    assert os.listdir(out) == ["data.bin"] and not os.path.exists(f"{out}.tmp")


def test_cli_reports_one_line(tmp_path, capsys):
    missing = tmp_path / "absent"
    code = _run_cli(["import-hf", "--hf-path", str(missing), "--output", str(tmp_path / "c")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and err.startswith("minitron import-hf")


# ---------------------------------------------------------------- SmolLM2-135M


@pytest.fixture(scope="session")
def smol_hf(smollm2):
    """(transformers model loaded from the GGUF, tokenizer)."""
    folder, gguf = smollm2
    model = _load_hf(folder, gguf_file=gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf,
                                                           local_files_only=True)
    return model, tokenizer


@pytest.fixture(scope="session")
def smol_ckpt(smollm2, tmp_path_factory):
    folder, gguf = smollm2
    ckpt = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    import_hf(folder, ckpt, gguf_file=gguf)
    return ckpt


@pytest.fixture(scope="session")
def smol_batch(smol_hf):
    """(tokens [2, 64] of English prose, transformers' logits [2, 64, 49152])."""
    model, tokenizer = smol_hf
    rows = [tokenizer(text)["input_ids"][:SMOL_SEQ] for text in PROSE]
    assert all(len(row) == SMOL_SEQ for row in rows)
    tokens = torch.tensor(rows)
    with torch.no_grad():
        return tokens, model(tokens).logits


def _check_smol_logits(logits, reference):
    max_abs = (logits - reference).abs().max().item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"SmolLM2 logits max-abs {max_abs:.3e}, greedy agreement {agree:.4f}")
    assert max_abs <= 1e-3
    assert agree == 1.0


def test_smollm2_config(smol_ckpt):
    cfg = load_config(smol_ckpt)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rotary_base == 100000.0 and cfg.extra["hf_architecture"] == "LlamaForCausalLM"


def test_smollm2_logits_tp1(smol_ckpt, smol_batch):
    tokens, reference = smol_batch
    _check_smol_logits(_mcore_logits_tp1(smol_ckpt, tokens), reference)


def test_smollm2_logits_tp3(smol_ckpt, smol_batch, tmp_path):
    """Tensor parallel at TP=3: SmolLM2's 9 heads in 3 query groups rule out TP=2."""
    tokens, reference = smol_batch
    _check_smol_logits(_logits_at_tp(tmp_path, {"smol": (smol_ckpt, tokens)}, 3)["smol"],
                       reference)


def test_smollm2_round_trip(smol_ckpt, smol_hf, smol_batch, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = smol_hf
    out = str(tmp_path / "smollm2_hf")
    assert _run_cli(["export-hf", "--load", smol_ckpt, "--output", out]) == 0
    reloaded = _load_hf(out)
    _assert_same_state(model.state_dict(), reloaded.state_dict())
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert exported_tokenizer(PROSE[0])["input_ids"] == tokenizer(PROSE[0])["input_ids"]
    tokens, reference = smol_batch
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, reference)


def test_smollm2_pruned_to_hidden_448_exports(smol_ckpt, smol_batch, tmp_path, monkeypatch):
    """SmolLM2 pruned to hidden 448 with 6 heads of 64 (448 is no multiple of 6, which
    LlamaConfig refuses) goes back to transformers and gives our logits."""
    from megatron_minitron.hf.mapping import hf_exportable
    from megatron_minitron.importance import random_scores
    from megatron_minitron.prune import prune_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pruned, exported = str(tmp_path / "pruned"), str(tmp_path / "hf")
    target = {"hidden_size": 448, "num_attention_heads": 6, "num_query_groups": 3,
              "num_layers": 12}
    prune_checkpoint(smol_ckpt, random_scores(load_config(smol_ckpt)), target, pruned)
    cfg = load_config(pruned)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_channels) == (448, 6, 64)
    assert hf_exportable(cfg) is None
    tokens = smol_batch[0][:, :32]
    ours = _mcore_logits_tp1(pruned, tokens)
    assert _run_cli(["export-hf", "--load", pruned, "--output", exported]) == 0
    assert json.load(open(os.path.join(exported, "config.json")))["architectures"] == [
        "MistralForCausalLM"]
    with torch.no_grad():
        _check_smol_logits(ours, _load_hf(exported)(tokens).logits)
