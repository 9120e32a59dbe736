"""One command that proves the GPU path: importance (NCCL, one rank), prune, eval and
distillation in bf16 on a tiny model and on SmolLM2-135M, compared with CPU fp32 numbers.

    python -m megatron_minitron.gpu_check --pack bench/gpu_pack   # here, on CPU: build the pack
    bash scripts/gpu_check.sh bench/gpu_pack                      # on the GPU machine
    python -m megatron_minitron.gpu_check --tiny                  # CPU stand-in of the tiny part

The GPU machine has no network and receives at most 64 MiB of files per command, so ``--pack``
(:mod:`megatron_minitron.gpu_pack`) writes what it needs into DIR: ``common/`` (the
megatron-core, gguf and psutil wheels, a text corpus, a tiny checkpoint with its tokenizer, and
``reference.pt``: the CPU fp32 importance scores, eval loss and first distillation-step loss of
both models, about 6 MiB) and SmolLM2's GGUF file cut into ``part0.bin`` and ``part1.bin``
(47 MiB each): send ``part0.bin`` with one command and ``part1.bin`` with ``common/`` in the
next.
``--pack-dir DIR`` (what the shell script runs) joins the parts, imports SmolLM2 and checks both
models; it writes ``bench/results/gpu_check.json`` with the device name. Per model it reports the
Spearman rank correlation of every importance score kind with the CPU fp32 scores, the eval loss
against the CPU's, the first distillation step's loss against the CPU's, and the tokens/s and
model FLOPs utilisation (against ``--peak-tflops``) of the distillation steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from megatron_minitron.errors import UsageError
from megatron_minitron.gpu_pack import build_pack, make_tiny, smollm2_from_pack, tiny_corpus

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
                jobs.append(("smollm2", smollm2_from_pack(args.pack_dir, work), text,
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
