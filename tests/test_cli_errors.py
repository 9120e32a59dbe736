"""Errors at the command line: bad input (UsageError) is one line and exit code 2; any other
exception (a bug, or mcore's and Transformer Engine's internal errors) keeps its traceback."""

import types

import pytest

from megatron_minitron import cli, parallel
from megatron_minitron.config import ModelConfig
from megatron_minitron.errors import UsageError


def _command_raising(monkeypatch, error):
    def main(args):
        raise error

    module = types.SimpleNamespace(add_arguments=lambda parser, name: None, main=main)
    monkeypatch.setattr(cli, "_command_module", lambda name: module)
    monkeypatch.delenv("MINITRON_DEBUG", raising=False)


def test_usage_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    _command_raising(monkeypatch, UsageError("--seq-length 0 must be >= 1"))
    assert cli.main(["eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["minitron eval: error: --seq-length 0 must be >= 1"]


def test_other_value_errors_keep_their_traceback(monkeypatch, capsys):
    internal = ValueError("Unsupported tensor layout for fused kernel")  # as mcore/TE raise
    _command_raising(monkeypatch, internal)
    with pytest.raises(ValueError) as caught:
        cli.main(["eval"])
    assert caught.value is internal and caught.traceback  # propagates: Python prints it
    assert "error:" not in capsys.readouterr().err


def test_our_own_input_checks_raise_usage_errors():
    with pytest.raises(UsageError, match="does not divide the world size 4"):
        parallel.check_layout(3, 1, 4)
    with pytest.raises(UsageError, match="num_attention_heads=6 is not divisible"):
        ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6,
                    num_query_groups=4, vocab_size=64)
    cfg = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      vocab_size=64)
    with pytest.raises(UsageError, match="--pipeline-model-parallel-size=2 does not divide"):
        cfg.check_layout(1, 2)
