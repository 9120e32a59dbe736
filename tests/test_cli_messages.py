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
