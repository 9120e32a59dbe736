"""Documents from text files, folders of text files and JSON lines, and their token ids.

What one document is:

* a text file (any file that is not JSON lines) is one document;
* a folder contributes each of its files, recursively, in sorted path order; hidden files and
  files that look binary (a NUL byte in their first 8 KiB) are skipped;
* a JSON lines file (``.jsonl``/``.json``, optionally ``.gz``) contributes one document per
  non-blank line, the string under ``json_key`` (default ``"text"``).

Files are read as UTF-8 (undecodable bytes replaced); ``.gz`` files are decompressed. Tokenizing
a document adds no BOS and appends the tokenizer's EOS; empty documents are skipped.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import IO, Iterable, Iterator, List, Sequence

from megatron_minitron.errors import UsageError

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _looks_binary(path: str) -> bool:
    if path.endswith(".gz"):
        return False
    with open(path, "rb") as handle:
        return b"\0" in handle.read(8192)


def input_files(paths: Sequence[str] | str) -> List[str]:
    """The files named by ``paths`` (files and folders, expanded recursively and sorted).

    Raises:
        UsageError: when a path does not exist or no file is found.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    files: List[str] = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [os.path.join(root, n) for n in names if not n.startswith(".")]
            files += sorted(f for f in found if os.path.isfile(f) and not _looks_binary(f))
        else:
            raise UsageError(f"input {path} does not exist; pass text files, folders of text "
                             "files or JSON lines files")
    if not files:
        raise UsageError(f"no input files found in {paths}; pass text or JSON lines files")
    return files


def _json_documents(path: str, json_key: str) -> Iterator[str]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{line_number} is not valid JSON ({err.msg}); JSON "
                                 "lines files hold one JSON object per line") from err
            if not isinstance(record, dict) or json_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UsageError(f"{path}:{line_number} has no key {json_key!r} (has {keys}); "
                                 "choose the text field with --json-key")
            text = record[json_key]
            if not isinstance(text, str):
                raise UsageError(f"{path}:{line_number}: {json_key!r} holds "
                                 f"{type(text).__name__}, not a string; choose another --json-key")
            yield text


def iter_documents(paths: Sequence[str] | str, json_key: str = "text") -> Iterator[str]:
    """Yields the documents of ``paths`` in order (see the module docstring).

    Args:
        paths: files and/or folders.
        json_key: the field holding the text in JSON lines files.
    """
    for path in input_files(paths):
        if path.endswith(_JSON_SUFFIXES):
            yield from _json_documents(path, json_key)
        else:
            with _open_text(path) as handle:
                yield handle.read()


def tokenize_document(text: str, tokenizer, eos: int) -> List[int]:
    """Token ids of one document followed by ``eos``; empty list for an empty document."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids) + [eos] if ids else []


def tokenize_documents(documents: Iterable[str], tokenizer, eos: int) -> Iterator[List[int]]:
    """Yields the token ids (EOS appended) of every non-empty document."""
    for text in documents:
        ids = tokenize_document(text, tokenizer, eos)
        if ids:
            yield ids
