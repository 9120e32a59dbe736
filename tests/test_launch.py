"""Launch scripts: dry runs print the exact torchrun/srun commands; every script passes shellcheck.

    python -m pytest -q tests/test_launch.py
"""

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
STAGES = {"importance": "importance", "prune": "prune", "distill": "distill",
          "correct_teacher": "correct-teacher", "search": "search", "eval": "eval", "run": "run"}
SBATCH = sorted((LAUNCH / "slurm").glob("*.sbatch"))
LAYOUT = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")


def clean_env(**extra):
    """A minimal environment (no SLURM_*, CUDA_VISIBLE_DEVICES, MASTER_ADDR from the caller)."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run_script(script, *args, dry=True, check=True, **env):
    if dry:
        env.setdefault("DRY_RUN", "1")
    result = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=clean_env(**env),
                            capture_output=True, text=True, timeout=30)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def commands(output):
    """The printed commands (non-comment lines), each split as a shell would."""
    return [shlex.split(line) for line in output.splitlines() if line and not line.startswith("#")]


def dry(script, *args, **env):
    printed = commands(run_script(script, *args, **env).stdout)
    assert len(printed) == 1, printed
    return printed[0]


def split_torchrun(command):
    """(launcher options, stage, stage arguments) of `torchrun OPTS -m megatron_minitron STAGE`."""
    assert command[0] == "torchrun", command
    module = command.index("-m")
    assert command[module + 1] == "megatron_minitron"
    return command[1:module], command[module + 2], command[module + 3:]


def option(words, flag):
    assert words.count(flag) == 1, (flag, words)
    return words[words.index(flag) + 1]


@pytest.mark.parametrize("script,stage", sorted(STAGES.items()))
def test_single_node_every_stage(script, stage):
    passthrough = ["--seq-length", "4096", "--note", "two words", "--empty", ""]
    command = dry(LAUNCH / f"{script}.sh", *passthrough, NGPU=8, TP=2, PP=2)
    launcher, printed_stage, args = split_torchrun(command)
    assert printed_stage == stage
    assert "--standalone" in launcher
    assert option(launcher, "--nnodes") == "1"
    assert option(launcher, "--nproc-per-node") == "8"
    assert "--rdzv-endpoint" not in launcher
    assert args[-len(passthrough):] == passthrough
    if stage == "run":  # the recipe carries each stage's layout
        assert not set(LAYOUT) & set(args)
    else:
        assert args[:4] == [LAYOUT[0], "2", LAYOUT[1], "2"]


PATHS = {
    "importance": ({"LOAD": "/c/teacher", "OUTPUT": "/c/s.pt", "DATA_PREFIX": "/d/calib"},
                   ["--load", "/c/teacher", "--output", "/c/s.pt", "--data-prefix", "/d/calib"]),
    "prune": ({"LOAD": "/c/t", "SCORES": "/c/s.pt", "TARGET": "hidden_size=3072,num_layers=16",
               "TARGET_TP": "8", "TARGET_PP": "2", "OUTPUT": "/c/p"},
              ["--load", "/c/t", "--scores", "/c/s.pt", "--target",
               "hidden_size=3072,num_layers=16", "--target-tp", "8", "--target-pp", "2",
               "--output", "/c/p"]),
    "distill": ({"STUDENT": "/c/p", "TEACHER": "/c/t", "OUTPUT": "/r/kd", "CONFIG": "kd.yaml",
                 "DATA_PREFIX": "0.3 /d/web 0.7 /d/code", "TEXT_FILE": "a.txt b.txt"},
                ["--student", "/c/p", "--teacher", "/c/t", "--output", "/r/kd", "--data-prefix",
                 "0.3", "/d/web", "0.7", "/d/code", "--text-file", "a.txt", "b.txt",
                 "--config", "kd.yaml"]),
    "correct_teacher": ({"LOAD": "/c/t", "OUTPUT": "/r/tc", "DATA_PREFIX": "/d/web"},
                        ["--load", "/c/t", "--output", "/r/tc", "--data-prefix", "/d/web"]),
    "search": ({"LOAD": "/c/t", "SCORES": "/c/s.pt", "PARAMS": "4.5B", "SPACE": "space.yaml",
                "OUTPUT": "/r/search"},
               ["--load", "/c/t", "--scores", "/c/s.pt", "--params", "4.5B", "--space",
                "space.yaml", "--output", "/r/search"]),
    "eval": ({"LOAD": "/c/p", "JSON": "/r/e.json", "TEXT_FILE": "/d/held out.txt"},
             ["--load", "/c/p", "--json", "/r/e.json", "--text-file", "/d/held", "out.txt"]),
    "run": ({"RECIPE": "examples/llama31_8b/recipe_width.yaml"},
            ["examples/llama31_8b/recipe_width.yaml"]),
}


@pytest.mark.parametrize("script", sorted(PATHS))
def test_path_variables_become_flags(script):
    variables, expected = PATHS[script]
    command = dry(LAUNCH / f"{script}.sh", "--extra", "1", NGPU=1, **variables)
    _, _, args = split_torchrun(command)
    if script != "run":
        args = args[4:]
    assert args == expected + ["--extra", "1"]


def test_prune_defaults_to_one_process():
    launcher, _, _ = split_torchrun(dry(LAUNCH / "prune.sh", CUDA_VISIBLE_DEVICES="0,1,2,3"))
    assert option(launcher, "--nproc-per-node") == "1"


def test_multi_node_c10d_rendezvous():
    command = dry(LAUNCH / "distill.sh", "--seq-length", "8192", NNODES=4, NPROC_PER_NODE=8,
                  NGPU=2, MASTER_ADDR="node017", MASTER_PORT=29555, RDZV_ID="job9", TP=8, PP=4,
                  NODE_RANK=3)
    launcher, stage, args = split_torchrun(command)
    assert stage == "distill"
    assert option(launcher, "--nnodes") == "4"
    assert option(launcher, "--nproc-per-node") == "8"  # NPROC_PER_NODE wins over NGPU
    assert option(launcher, "--rdzv-backend") == "c10d"
    assert option(launcher, "--rdzv-endpoint") == "node017:29555"
    assert option(launcher, "--rdzv-id") == "job9"
    assert "--standalone" not in launcher and "--node-rank" not in launcher
    assert args == [LAYOUT[0], "8", LAYOUT[1], "4", "--seq-length", "8192"]


def test_multi_node_static_rendezvous():
    launcher, _, _ = split_torchrun(dry(LAUNCH / "importance.sh", NNODES=2, NGPU=8,
                                        MASTER_ADDR="10.0.0.1", RDZV_BACKEND="static",
                                        NODE_RANK=1, TORCHRUN_ARGS="--max-restarts 0"))
    assert option(launcher, "--node-rank") == "1"
    assert option(launcher, "--master-addr") == "10.0.0.1"
    assert option(launcher, "--master-port") == "29500"
    assert "--rdzv-endpoint" not in launcher
    assert launcher[-2:] == ["--max-restarts", "0"]


def test_node_rank_defaults_to_slurm_nodeid():
    launcher, _, _ = split_torchrun(dry(LAUNCH / "eval.sh", NNODES=2, NGPU=8, MASTER_ADDR="h",
                                        RDZV_BACKEND="static", SLURM_NODEID=1))
    assert option(launcher, "--node-rank") == "1"


@pytest.mark.parametrize("env,message", [
    ({"NNODES": 2, "NGPU": 8}, "needs MASTER_ADDR"),
    ({"NGPU": 6, "TP": 4}, "does not divide the world size 6"),
    ({"NNODES": 2, "NGPU": 4, "MASTER_ADDR": "h", "TP": 4, "PP": 4}, "world size 8"),
    ({"NGPU": "eight"}, "NPROC_PER_NODE=eight must be a positive integer"),
    ({"NNODES": 2, "NGPU": 1, "MASTER_ADDR": "h", "RDZV_BACKEND": "etcd"}, "use c10d or static"),
])
def test_bad_settings_fail_with_one_line(env, message):
    result = run_script(LAUNCH / "distill.sh", check=False, **env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().startswith("launch: error:")
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _fake_tool(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_gpu_count_defaults(tmp_path):
    script = LAUNCH / "eval.sh"
    _fake_tool(tmp_path, "nvidia-smi", "for i in 0 1 2 3; do echo \"GPU $i: NVIDIA A100\"; done")
    path = f"{tmp_path}:{os.environ['PATH']}"
    assert option(split_torchrun(dry(script, PATH=path))[0], "--nproc-per-node") == "4"
    assert option(split_torchrun(dry(script, PATH=path, CUDA_VISIBLE_DEVICES="2,3"))[0],
                  "--nproc-per-node") == "2"
    _fake_tool(tmp_path, "nvidia-smi", "exit 9")
    assert option(split_torchrun(dry(script, PATH=path))[0], "--nproc-per-node") == "1"


def test_real_run_execs_the_printed_command(tmp_path):
    record = tmp_path / "argv"
    fake = _fake_tool(tmp_path, "fake-torchrun", f'printf "%s\\n" "$@" > {record}')
    env = dict(NGPU=2, TP=2, LOAD="/c/t", TORCHRUN=str(fake))
    printed = dry(LAUNCH / "eval.sh", "--note", "a b", **env)
    result = run_script(LAUNCH / "eval.sh", "--note", "a b", dry=False, **env)
    assert result.stderr.startswith("launch: ")
    assert record.read_text().splitlines() == printed[1:]


def header_commands(path):
    """Commands in the header's example block (between the first two bare '#' lines)."""
    lines = path.read_text().splitlines()
    start = lines.index("#")
    block = lines[start + 1:lines.index("#", start + 1)]
    found, current = [], None
    for line in block:
        if line.startswith("#   "):
            current = (current or "") + " " + line[1:].strip().rstrip("\\").strip()
        else:
            if current:
                found.append(current.strip())
            current = None
    if current:
        found.append(current.strip())
    return found


def run_invocation(text):
    words = shlex.split(text)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words[0].split("=", 1)
        env[key] = value
        words.pop(0)
    assert words[0] == "bash", text
    return run_script(ROOT / words[1], *words[2:], **env).stdout


@pytest.mark.parametrize("script", sorted(STAGES))
def test_wrapper_header_shows_the_exact_command(script):
    invocation, expected = header_commands(LAUNCH / f"{script}.sh")
    assert f"bash launch/{script}.sh" in invocation
    assert commands(run_invocation(invocation)) == [shlex.split(expected)]


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_sbatch_header_shows_the_exact_commands(path):
    submit, invocation, srun, torchrun = header_commands(path)
    assert f"sbatch --account=ACCOUNT --partition=PARTITION" in submit
    assert submit.endswith(invocation.split(f"launch/slurm/{path.name}", 1)[1])
    assert commands(run_invocation(invocation)) == [shlex.split(srun), shlex.split(torchrun)]


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_sbatch_directives(path):
    lines = path.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1)
                         if line.strip() and not line.startswith("#"))
    directives = {}
    for index, line in enumerate(lines):
        if line.startswith("#SBATCH"):
            assert index < first_command, "sbatch ignores #SBATCH after the first command"
            key, _, value = line.split(None, 1)[1].partition("=")
            directives[key] = value
    assert directives["--account"] == "ACCOUNT" and directives["--partition"] == "PARTITION"
    assert directives["--ntasks-per-node"] == "1"  # one torchrun per node
    assert directives["--gpus-per-node"] == "8" and directives["--nodes"] == "1"
    assert directives["--job-name"].startswith("minitron-")


SLURM_MULTI = dict(SLURM_JOB_NODELIST="dgx-a[07-09],dgx-b01", SLURM_JOB_NUM_NODES=4,
                   SLURM_JOB_ID=77, NGPU=8, TP=4, PP=2, STUDENT="/c/p", TEACHER="/c/t",
                   CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.09-py3",
                   CONTAINER_MOUNTS="/lustre:/lustre")


def test_slurm_multi_node_distill():
    result = run_script(LAUNCH / "slurm" / "distill.sbatch", "--train-tokens", "94000000000",
                        **SLURM_MULTI)
    first = result.stdout.splitlines()[0]
    assert first == ("# nodes (4): dgx-a07 dgx-a08 dgx-a09 dgx-b01; "
                     "rendezvous dgx-a07:29500")
    srun, torchrun = commands(result.stdout)
    script = srun.index("bash")
    assert srun[0] == "srun" and srun[script + 1] == f"{ROOT}/launch/distill.sh"
    assert srun[script + 2:] == ["--train-tokens", "94000000000"]
    options = srun[1:srun.index("env")]
    assert {"--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "--container-image=nvcr.io#nvidia/pytorch:25.09-py3",
            "--container-mounts=/lustre:/lustre", f"--container-workdir={ROOT}"} == set(options)
    assignments = dict(word.split("=", 1) for word in srun[srun.index("env") + 1:script])
    assert assignments == {"NNODES": "4", "NPROC_PER_NODE": "8", "MASTER_ADDR": "dgx-a07",
                           "MASTER_PORT": "29500", "RDZV_ID": "77", "TP": "4", "PP": "2",
                           "STUDENT": "/c/p", "TEACHER": "/c/t"}
    launcher, stage, args = split_torchrun(torchrun)
    assert stage == "distill"
    assert option(launcher, "--nnodes") == "4" and option(launcher, "--nproc-per-node") == "8"
    assert option(launcher, "--rdzv-endpoint") == "dgx-a07:29500"
    assert option(launcher, "--rdzv-id") == "77"
    assert args == [LAYOUT[0], "4", LAYOUT[1], "2", "--student", "/c/p", "--teacher", "/c/t",
                    "--train-tokens", "94000000000"]
    # every node runs the srun task with its own SLURM_NODEID and joins the same rendezvous
    for node in range(4):
        assert dry(ROOT / "launch" / "distill.sh", "--train-tokens", "94000000000",
                   SLURM_NODEID=node, **assignments) == torchrun


def test_slurm_single_node_is_standalone():
    result = run_script(LAUNCH / "slurm" / "eval.sbatch", SLURM_JOB_NODELIST="dgx001",
                        SLURM_GPUS_ON_NODE=4, LOAD="/c/p", MASTER_ADDR="stale")
    srun, torchrun = commands(result.stdout)
    assert "--nodes=1" in srun and not any(w.startswith("--container") for w in srun)
    assert not any(word.startswith("MASTER_ADDR=") for word in srun)
    launcher, stage, _ = split_torchrun(torchrun)
    assert stage == "eval" and "--standalone" in launcher
    assert option(launcher, "--nproc-per-node") == "4"


def test_slurm_uses_scontrol_when_present(tmp_path):
    _fake_tool(tmp_path, "scontrol",
               '[ "$1 $2 $3" = "show hostnames gpu[1-2]" ] && printf "gpu1\\ngpu2\\n"')
    result = run_script(LAUNCH / "slurm" / "recipe.sbatch", SLURM_JOB_NODELIST="gpu[1-2]",
                        RECIPE="r.yaml", PATH=f"{tmp_path}:{os.environ['PATH']}")
    srun, torchrun = commands(result.stdout)
    assert "MASTER_ADDR=gpu1" in srun and "NNODES=2" in srun
    assert option(split_torchrun(torchrun)[0], "--rdzv-endpoint") == "gpu1:29500"
    assert split_torchrun(torchrun)[1:] == ("run", ["r.yaml"])


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="scontrol does the expansion")
@pytest.mark.parametrize("nodelist,hosts", [
    ("a[1-3],b,c[08-10]-ib", ["a1", "a2", "a3", "b", "c08-ib", "c09-ib", "c10-ib"]),
    ("dgx[001-002,010]", ["dgx001", "dgx002", "dgx010"]),
    ("single", ["single"]),
])
def test_hostlist_expansion_without_slurm(nodelist, hosts):
    result = subprocess.run(["bash", "-c", '. launch/slurm/common.sh && minitron_hostnames "$1"',
                             "_", nodelist], cwd=ROOT, env=clean_env(), capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == hosts


@pytest.mark.parametrize("env,message", [
    ({}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": 3}, "holds 2 hosts"),
])
def test_slurm_bad_settings(env, message):
    result = run_script(LAUNCH / "slurm" / "prune.sbatch", check=False, **env)
    assert result.returncode == 2 and message in result.stderr


def shell_scripts():
    return (sorted(LAUNCH.rglob("*.sh")) + SBATCH + sorted((ROOT / "examples").rglob("*.sh"))
            + sorted((ROOT / "scripts").glob("*.sh")) + sorted((ROOT / "bench").glob("*.sh")))


def test_shellcheck():
    beside_python = Path(sys.executable).parent / "shellcheck"  # the venv's, not activated
    shellcheck = shutil.which("shellcheck") or (str(beside_python) if beside_python.is_file()
                                                else None)
    if shellcheck is None:
        if os.environ.get("MINITRON_REQUIRE_ASSETS") == "1":
            pytest.fail('shellcheck is not installed (pip install -e ".[test]" brings it)')
        pytest.skip("shellcheck is not installed")
    scripts = [str(path.relative_to(ROOT)) for path in shell_scripts()]
    assert len(scripts) >= 19
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
