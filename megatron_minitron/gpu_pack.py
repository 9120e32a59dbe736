"""The GPU check's tiny model and its pack (see :mod:`megatron_minitron.gpu_check`).

``build_pack`` writes, on a CPU machine with the assets, what the GPU machine (no network, at
most 64 MiB of files per command) needs: ``common/`` (the megatron-core, gguf and psutil wheels
for the GPU's Python, a text corpus, a tiny checkpoint with its tokenizer, the CPU fp32
reference numbers) and SmolLM2's GGUF file in two parts; ``smollm2_from_pack`` joins the parts
there, checks their digests and imports the model with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List

from megatron_minitron.errors import UsageError

PART_BYTES = 50 * 2 ** 20  # a part plus common/ and the repository stay under 64 MiB
WHEELS = ("megatron-core==0.19.2", "gguf=={gguf}", "psutil=={psutil}")
GPU_PYTHON = "3.12"  # the NGC image's; psutil is the one wheel with compiled code
TINY_MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=512, max_position_embeddings=256)


def tiny_corpus(path: str, words: int = 60_000, seed: int = 0) -> str:
    """Deterministic pseudo-English (a few hundred distinct words) for the tiny model."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gu", "ro"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
                  for _ in range(400)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]  # Zipf-like
    text = []
    for index in range(words):
        text.append(rng.choices(vocabulary, weights)[0])
        if index % 11 == 10:
            text[-1] += ".\n" if index % 77 == 76 else "."
    with open(path, "w") as handle:
        handle.write(" ".join(text))
    return path


def make_tiny(folder: str, text: str) -> str:
    """A byte-level BPE tokenizer (512 ids) trained on ``text`` and a tiny model of realistic
    weight scale (:func:`megatron_minitron.testing.models.spread_weights`); returns the
    checkpoint path."""
    from megatron_minitron.testing.models import save_bpe_tokenizer, save_realistic_checkpoint

    tokenizer_dir = save_bpe_tokenizer(os.path.join(folder, "tokenizer"),
                                       TINY_MODEL["vocab_size"], files=[text])
    ckpt = os.path.join(folder, "tiny")
    save_realistic_checkpoint(ckpt, tokenizer_dir, seed=1234, **TINY_MODEL)
    return ckpt


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2 ** 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_checksum(ckpt: str) -> float:
    """Sum of |w| over every weight (fp64): the same import on both machines gives the same."""
    from megatron_minitron import parallel
    from megatron_minitron.checkpoint.io import load_checkpoint

    with parallel.parallel_context(1, 1):
        model, _ = load_checkpoint(ckpt)
        return float(sum(p.detach().double().abs().sum().item() for p in model.parameters()))


def _corpus_from_linux_doc(path: str, size: int = 2 * 2 ** 20) -> str:
    import glob

    from megatron_minitron import assets

    files = sorted(glob.glob(os.path.join(assets.linux_doc(), "**", "*.rst.txt"),
                             recursive=True))
    written = 0
    with open(path, "w") as out:
        for name in files:
            with open(name, errors="replace") as handle:
                part = handle.read()
            out.write(part + "\n\n")
            written += len(part)
            if written >= size:
                break
    return path


def split_file(source: str, pack: str) -> List[Dict[str, Any]]:
    """Cuts ``source`` into ``pack/part0.bin`` and ``pack/part1.bin`` of equal size (each with
    ``common/`` must stay under the 64 MiB a command receives); returns their manifest rows."""
    half = -(-os.path.getsize(source) // 2)
    if half > PART_BYTES:
        raise RuntimeError(f"{source} does not fit two parts of {PART_BYTES} bytes")
    parts = []
    with open(source, "rb") as handle:
        for index in range(2):
            part = os.path.join(pack, f"part{index}.bin")
            with open(part, "wb") as out:
                out.write(handle.read(half))
            parts.append({"file": os.path.basename(part), "bytes": os.path.getsize(part),
                          "sha256": _sha256(part)})
    return parts


def build_pack(pack: str) -> None:
    """Writes the pack (see the module docstring); runs on a CPU machine with the assets."""
    import importlib.metadata
    import subprocess

    from megatron_minitron import assets
    from megatron_minitron.gpu_check import reference
    from megatron_minitron.hf.convert import import_hf

    common = os.path.join(pack, "common")
    if os.path.exists(pack):
        shutil.rmtree(pack)
    os.makedirs(os.path.join(common, "wheels"))
    versions = {name: importlib.metadata.version(name) for name in ("gguf", "psutil")}
    for requirement in WHEELS:
        requirement = requirement.format(**versions)
        extra = ["--only-binary=:all:", "--python-version", GPU_PYTHON]  # the GPU's Python
        if requirement.startswith("psutil"):
            extra += ["--platform", "manylinux2014_x86_64"]

        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "-d", os.path.join(common, "wheels"), *extra, requirement],
                              capture_output=True, text=True)
        if done.returncode:
            raise UsageError(f"pip download {requirement} failed: "
                             f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    text = _corpus_from_linux_doc(os.path.join(common, "text.txt"))
    tiny = make_tiny(common, text)

    directory, gguf = assets.smollm2()
    parts = split_file(os.path.join(directory, gguf), pack)

    with tempfile.TemporaryDirectory() as work:
        smollm2 = os.path.join(work, "smollm2")
        import_hf(directory, smollm2, gguf_file=gguf)
        refs = {"tiny": reference("tiny", tiny, text, os.path.join(work, "tiny_ref")),
                "smollm2": reference("smollm2", smollm2, text, os.path.join(work, "s_ref"))}
        checksum = weights_checksum(smollm2)
    import torch

    torch.save(refs, os.path.join(common, "reference.pt"))
    manifest = {"gguf_file": gguf, "parts": parts, "smollm2_weights_abs_sum": checksum,
                "wheels": sorted(os.listdir(os.path.join(common, "wheels"))),
                "made_on": platform.node(), "made_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(common, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
    sizes = {p: os.path.getsize(os.path.join(pack, p)) for p in ("part0.bin", "part1.bin")}
    sizes["common"] = sum(os.path.getsize(os.path.join(root, f))
                          for root, _, files in os.walk(common) for f in files)
    print(f"wrote {pack}: " + ", ".join(f"{k} {v / 2 ** 20:.1f} MiB" for k, v in sizes.items()))


def smollm2_from_pack(pack: str, work: str) -> str:
    """Joins the GGUF parts (checking their digests) and imports the model."""
    from megatron_minitron.hf.convert import import_hf

    with open(os.path.join(pack, "common", "manifest.json")) as handle:
        manifest = json.load(handle)
    gguf_dir = os.path.join(work, "gguf")
    os.makedirs(gguf_dir, exist_ok=True)
    joined = os.path.join(gguf_dir, manifest["gguf_file"])
    with open(joined, "wb") as out:
        for part in manifest["parts"]:
            path = os.path.join(pack, part["file"])
            if not os.path.isfile(path) or _sha256(path) != part["sha256"]:
                raise UsageError(f"{path} is missing or differs from the pack's; send "
                                 f"{part['file']} again")
            with open(path, "rb") as handle:
                shutil.copyfileobj(handle, out)
    ckpt = os.path.join(work, "smollm2")
    import_hf(gguf_dir, ckpt, gguf_file=manifest["gguf_file"])
    checksum = weights_checksum(ckpt)
    expected = manifest["smollm2_weights_abs_sum"]
    if abs(checksum - expected) > 1e-9 * abs(expected):
        raise RuntimeError(f"SmolLM2 imported with different weights here (sum |w| {checksum} "
                           f"vs {expected} at pack time)")
    return ckpt
