"""What a newcomer sees on the terminal: no Megatron-Core banner lines unless asked for, one-line
errors for bad values."""

import os
import subprocess
import sys

import pytest

BANNER = "Megatron-FSDP"


def _run(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k != "MINITRON_DEBUG"}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "megatron_minitron", *args], env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_error_and_help_carry_no_megatron_banner(tmp_path):
    done = _run("eval", "--load", str(tmp_path / "missing"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minitron eval: error:"), done.stderr
    assert BANNER not in done.stdout + done.stderr
    helped = _run("prune", "--help")
    assert helped.returncode == 0 and BANNER not in helped.stdout + helped.stderr
    assert "--verbose" in helped.stdout


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_lets_megatron_logs_through(tmp_path, how):

    args = ["eval", "--load", str(tmp_path / "missing")]
    done = _run(*args, "--verbose") if how == "flag" else _run(*args, env={"MINITRON_DEBUG": "1"})
    assert BANNER in done.stdout + done.stderr


def test_load_of_a_training_output_folder_reads_its_final_model(tmp_path, tiny_tokenizer_dir,
                                                                 capsys):
    import functools
    import json

    from conftest import tiny_text
    from megatron_minitron.cli import main as cli
    from megatron_minitron.testing import save_tiny_checkpoint, spawn

    run = tmp_path / "distilled"
    spawn(functools.partial(save_tiny_checkpoint, vocab_size=320), 1, str(run / "final"),
          tiny_tokenizer_dir)
    (run / "checkpoints").mkdir()
    text = tmp_path / "text.txt"
    text.write_text(tiny_text(800, seed=3))
    out = tmp_path / "eval.json"
    assert cli(["eval", "--load", str(run), "--text-file", str(text), "--seq-length", "32",
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["loss"] > 0 and result["checkpoint"].endswith("final"), result

    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    capsys.readouterr()
    assert cli(["eval", "--load", str(unfinished), "--text-file", str(text),
                "--seq-length", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without a final model" in err[0] and "--resume auto" in err[0], err


def test_import_under_a_pipe_draws_no_bars(tmp_path, tiny_tokenizer_dir):
    """transformers' own weight-loading bars stay off a pipe, like ours."""
    import shutil

    import transformers

    hf = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), hf / name)
    done = _run("import-hf", "--hf-path", str(hf), "--output", str(tmp_path / "ckpt"),
                env={"MINITRON_PROGRESS": ""})
    assert done.returncode == 0, done.stderr
    assert "it/s]" not in done.stderr and "%|" not in done.stderr, done.stderr
