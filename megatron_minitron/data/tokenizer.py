"""Hugging Face tokenizers: loading from a tokenizer folder, a checkpoint or a GGUF file, and the
checks that tie a tokenizer to a model."""

from __future__ import annotations

import os

from megatron_minitron.errors import UsageError

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _tokenizer_folder(path: str) -> str | None:
    """``path/tokenizer`` of a checkpoint, or ``path`` itself when it holds tokenizer files."""
    inner = os.path.join(path, "tokenizer")  # checkpoint.io.TOKENIZER_DIR
    if os.path.isdir(inner):
        return inner
    if any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        return path
    return None


def load_tokenizer(path: str):
    """Loads a Hugging Face tokenizer.

    Args:
        path: a Hugging Face tokenizer folder (``tokenizer_config.json`` or ``tokenizer.json``),
            a checkpoint of ours holding ``tokenizer/``, or a ``.gguf`` model file.

    Returns:
        A ``transformers`` tokenizer.

    Raises:
        UsageError: when ``path`` holds no tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(path) and path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path))
    if not os.path.exists(path):
        raise UsageError(f"--tokenizer {path} does not exist; pass a Hugging Face tokenizer "
                         "folder or a checkpoint saved with its tokenizer")
    folder = None
    if os.path.isdir(path):
        from megatron_minitron.checkpoint import megatron_lm

        checkpoint = megatron_lm.resolve(path, strict=False)  # a save dir: its iteration folder
        folder = _tokenizer_folder(checkpoint)
        if folder is None and megatron_lm.is_megatron_lm(checkpoint):  # args.tokenizer_model
            folder = megatron_lm.tokenizer_folder(checkpoint, path)
            if folder is None:
                raise megatron_lm.missing_tokenizer_error(path)
    if folder is None:
        raise UsageError(
            f"--tokenizer {path} holds no tokenizer (no tokenizer/ folder, tokenizer_config.json "
            "or tokenizer.json); pass a Hugging Face tokenizer folder or a checkpoint saved with "
            "its tokenizer")
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    return AutoTokenizer.from_pretrained(folder)


def eos_id(tokenizer) -> int:
    """The id appended after every document (the tokenizer's EOS token).

    Raises:
        UsageError: when the tokenizer defines no EOS token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UsageError("the tokenizer defines no EOS token, which separates documents; "
                         "use a tokenizer with an eos_token")
    return int(eos)


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """Checks that every id of ``tokenizer`` has a row in the model's embedding.

    Raises:
        UsageError: when ``len(tokenizer) > vocab_size``.
    """
    size = len(tokenizer)
    if size > vocab_size:
        raise UsageError(
            f"tokenizer has {size} tokens but the model's vocab_size is {vocab_size}; use the "
            "model's own tokenizer (the one saved in its checkpoint) or a model whose vocabulary "
            "is at least as large")
