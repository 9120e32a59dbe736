"""Distillation step cost: ours vs (teacher forward + student forward-backward) and vs NVIDIA
Model Optimizer's Megatron distillation, on the same models, at TP=1 and TP=2.

    python bench/distill.py                      # writes bench/results/distill.json
    python bench/distill.py --tp 1 --repeats 3   # one layout, fewer rounds
    python bench/distill.py --no-peer            # without Model Optimizer

Models (the peer figures of ENVIRONMENT.md): teacher mcore GPT with 8 layers, hidden 512,
8 heads / 4 query groups, SwiGLU 1536, vocab 49,152; student hidden 384, SwiGLU 1024; one
micro-batch of 4 × 256 tokens, fp32. Timed, interleaved round-robin (minimum over rounds):

* ``teacher_forward``: the teacher's logits, no grad;
* ``student_fwd_bwd``: the student with labels (mcore's cross entropy) and backward;
* ``distill_step``: our training step without the optimizer — mcore's schedule over the
  DDP-wrapped co-located model, KL loss, backward into DDP's gradient buffers;
* ``ce_step``: the same path training on cross-entropy alone (no teacher);
* ``modelopt_step``: Model Optimizer 0.47's ``DistillationModel`` (``LogitsKLLoss``) forward,
  ``compute_kd_loss`` and backward, as Megatron-LM's post-training loop runs it.

Peak memory of each (allocator-independent: bytes of tensors created inside the step, see
``megatron_minitron.distill.memory``) is reported above the plain student step, in units of one
fp32 logits tensor; the logits losses alone are compared on random logits too.

Model Optimizer is installed only into ``bench/.venv-modelopt``, a virtual environment layered
on the current one (``pip install nvidia-modelopt==0.47.0``); the measurements run in its
interpreter so that all variants share one process per layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PEER_ENV = os.path.join(HERE, ".venv-modelopt")
PEER_PACKAGE = "nvidia-modelopt==0.47.0"
SEQ, BATCH = 256, 4


def model_configs(quick: bool):
    from megatron_minitron.config import ModelConfig

    vocab = 8192 if quick else 49152
    layers = 2 if quick else 8
    teacher = ModelConfig(num_layers=layers, hidden_size=512, ffn_hidden_size=1536,
                          num_attention_heads=8, num_query_groups=4, vocab_size=vocab,
                          max_position_embeddings=SEQ)
    student = teacher.replace(hidden_size=384, ffn_hidden_size=1024, kv_channels=None)
    return teacher, student


# ----------------------------------------------------------------------------- peer environment


def peer_python() -> str | None:
    """The interpreter of bench/.venv-modelopt, creating it on first use; None if impossible."""
    python = os.path.join(PEER_ENV, "bin", "python")
    if os.path.isfile(python) and subprocess.run(
            [python, "-c", "import modelopt.torch.distill"], capture_output=True).returncode == 0:
        return python
    print(f"setting up {PEER_ENV} with {PEER_PACKAGE} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", PEER_ENV], check=True)
    site_packages = sysconfig.get_paths()["purelib"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    layer = os.path.join(PEER_ENV, "lib", version, "site-packages", "_base_environment.pth")
    with open(layer, "w") as handle:  # torch, megatron-core and this package from here
        handle.write(f"import site; site.addsitedir({site_packages!r})\n")
    result = subprocess.run([python, "-m", "pip", "install", "-q", PEER_PACKAGE],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"could not install {PEER_PACKAGE}: {result.stderr.strip()[-500:]}")
        return None
    return python


# ----------------------------------------------------------------------------- measurement


def _timed_round(fns, barrier):
    """{name: (wall seconds, CPU seconds)} of one call each; the slowest rank's."""
    import torch

    times = {}
    for name, fn in fns.items():
        barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        spent = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu])
        torch.distributed.all_reduce(spent, op=torch.distributed.ReduceOp.MAX)
        times[name] = spent.tolist()
    return times


def _best(rounds, name, index):
    return min(r[name][index] for r in rounds)


def _peer_model(student, teacher):
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins.megatron import (
        DistillationConfig,
        adjust_distillation_model_for_mcore,
        setup_distillation_config,
    )

    config = setup_distillation_config(DistillationConfig(), student.config, teacher.config)
    model = mtd.convert(student, mode=[("kd_loss", {
        "teacher_model": teacher, "criterion": config.criterion,
        "loss_balancer": config.loss_balancer})])
    adjust_distillation_model_for_mcore(model, config)
    model.train()
    return model


def _peer_step(model, batch):
    """Megatron-LM's post-training loss: masked token sums, KD loss through the balancer."""
    import torch

    from megatron_minitron import adapter
    from megatron_minitron.model.forward import position_ids_for

    mask = batch["loss_mask"]

    def masked(output):
        output, tp_reduce = (output[0], output[1]) if isinstance(output, tuple) else (output,
                                                                                        False)
        loss = torch.sum(output.reshape(-1).float() * mask.reshape(-1))
        if tp_reduce:
            torch.distributed.all_reduce(loss, group=adapter.get_tp_group())
        return loss

    tokens = batch["tokens"]
    output = model(tokens, position_ids_for(tokens), None, labels=batch["labels"])
    losses = model.compute_kd_loss(student_loss=masked(output), loss_reduction_fn=masked)
    losses["kd_loss"].backward()
    model.zero_grad(set_to_none=True)
    return losses


def _loss_only(spec_kind, tp_group, peer_config, repeats: int):
    """Our chunked KL vs a plain log-softmax KL (and the peer's LogitsKLLoss) on random logits."""
    import torch

    from megatron_minitron import adapter
    from megatron_minitron.distill.losses import LogitLossSpec, logits_loss
    from megatron_minitron.distill.memory import LiveTensorBytes

    tp = torch.distributed.get_world_size(tp_group)
    local_vocab = 49152 // tp
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(SEQ, BATCH, local_vocab, generator=generator)
    teacher = torch.randn(SEQ, BATCH, local_vocab, generator=generator)
    labels = torch.randint(0, local_vocab * tp, (SEQ, BATCH), generator=generator)
    logits_bytes = student.numel() * 4

    def ours():
        s = student.clone().requires_grad_(True)
        logits_loss(s, teacher.clone(), labels, None, LogitLossSpec(spec_kind), tp_group,
                    teacher_writable=True).total.backward()

    def plain():  # what one writes first: log-softmax of all-gathered logits, kl_div, autograd
        s = student.clone().requires_grad_(True)
        from megatron_minitron.distill.reference import _gather_vocab

        full_s, full_t = _gather_vocab(s, tp_group), _gather_vocab(teacher.clone(), tp_group)
        log_p = torch.log_softmax(full_s, -1)
        log_q = torch.log_softmax(full_t, -1)
        torch.nn.functional.kl_div(log_p, log_q, reduction="sum", log_target=True).backward()

    fns = {"ours": ours, "plain": plain}
    if peer_config is not None:
        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

        criterion = LogitsKLLoss(peer_config)

        def modelopt():
            s = student.clone().requires_grad_(True)
            loss, _, _ = criterion(s, teacher.clone())
            total = loss.sum()
            total.backward()

        fns["modelopt"] = modelopt
    barrier = torch.distributed.barrier
    rounds = [_timed_round(fns, barrier) for _ in range(repeats)]
    result = {}
    for name, fn in fns.items():
        # the clones of the inputs are made inside: subtract them (2 logits tensors)
        with LiveTensorBytes() as tracker:
            fn()
        result[name] = {"seconds": _best(rounds, name, 0),
                        "cpu_seconds": _best(rounds, name, 1),
                        "extra_peak_logits": round(tracker.peak / logits_bytes - 2.0, 3)}
    return result


def worker(tp: int, repeats: int, quick: bool, peer: bool, out: str) -> None:
    import torch

    from megatron_minitron import adapter, parallel
    from megatron_minitron.distill.losses import LogitLossSpec
    from megatron_minitron.distill.memory import LiveTensorBytes
    from megatron_minitron.distill.setup import wrap_for_training
    from megatron_minitron.distill.trainer import run_schedule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS_PER_RANK", "1")))
    parallel.initialize(tp, 1, seed=1)
    teacher_cfg, student_cfg = model_configs(quick)
    teacher = adapter.build_gpt_model(teacher_cfg).eval()
    students = [adapter.build_gpt_model(student_cfg) for _ in range(4)]
    for other in students[1:]:
        other.load_state_dict(students[0].state_dict())
    plain_student, ours_student, ce_student, peer_student = students
    _, distill_ddp = wrap_for_training(ours_student, teacher, student_cfg, teacher_cfg)
    _, ce_ddp = wrap_for_training(ce_student, None, student_cfg, None)
    peer_model = _peer_model(peer_student, teacher) if peer else None
    student_config_for_peer = plain_student.config if peer else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, teacher_cfg.vocab_size, (BATCH, SEQ + 1), generator=generator)
    batch = {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "loss_mask": torch.ones(BATCH, SEQ)}
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    kl, ce = LogitLossSpec("kl"), LogitLossSpec("kl", kd_weight=0.0, ce_weight=1.0)

    def teacher_forward():
        with torch.no_grad():
            adapter.stage_forward(teacher, batch["tokens"], positions)

    def student_fwd_bwd():
        plain_student(batch["tokens"], positions, None, labels=batch["labels"]).sum().backward()
        plain_student.zero_grad(set_to_none=True)

    def distill_step():
        distill_ddp.zero_grad_buffer()
        return run_schedule(distill_ddp, kl, [batch], forward_only=False)

    def ce_step():
        ce_ddp.zero_grad_buffer()
        run_schedule(ce_ddp, ce, [batch], forward_only=False)

    fns = {"teacher_forward": teacher_forward, "student_fwd_bwd": student_fwd_bwd,
           "distill_step": distill_step, "ce_step": ce_step}
    if peer:
        fns["modelopt_step"] = lambda: _peer_step(peer_model, batch)
    barrier = torch.distributed.barrier
    _timed_round(fns, barrier)  # warm-up
    rounds = [_timed_round(fns, barrier) for _ in range(repeats)]
    seconds = {name: _best(rounds, name, 0) for name in fns}
    cpu = {name: _best(rounds, name, 1) for name in fns}
    logits_bytes = BATCH * SEQ * (teacher_cfg.vocab_size // tp) * 4
    peaks = {}
    for name in ("student_fwd_bwd", "distill_step", "ce_step", "modelopt_step"):
        if name in fns:
            with LiveTensorBytes() as tracker:
                fns[name]()
            peaks[name] = tracker.peak
    sums = distill_step()
    kd_ours = float(sums[1])
    kd_peer = float(_peer_step(peer_model, batch)["logits_loss"]) if peer else None
    base = seconds["teacher_forward"] + seconds["student_fwd_bwd"]
    cpu_base = cpu["teacher_forward"] + cpu["student_fwd_bwd"]
    variants = [k for k in ("distill_step", "modelopt_step", "ce_step") if k in seconds]
    from common import matmul_flops_per_s

    result = {
        "tp": tp, "threads_per_rank": torch.get_num_threads(),
        # every rank measures at once, as they run: the ceiling of the TP group is their sum
        "matmul_gflops": tp * matmul_flops_per_s() / 1e9,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "cpu_seconds": {k: round(v, 4) for k, v in cpu.items()},
        "tokens_per_second": {k: round(BATCH * SEQ / v, 1) for k, v in seconds.items()},
        "ratio_to_teacher_fwd_plus_student_fwd_bwd": {
            k: round(seconds[k] / base, 3) for k in variants},
        "cpu_ratio_to_teacher_fwd_plus_student_fwd_bwd": {
            k: round(cpu[k] / cpu_base, 3) for k in variants},
        "peak_bytes": peaks,
        "extra_peak_over_student_step_in_logits": {
            k: round((v - peaks["student_fwd_bwd"]) / logits_bytes, 2) for k, v in peaks.items()},
        "logits_tensor_bytes": logits_bytes,
        "kd_sum_ours": kd_ours, "kd_sum_modelopt": kd_peer,
        "loss_only": _loss_only("kl", adapter.get_tp_group(), student_config_for_peer,
                                repeats) if not quick else None,
        "rounds": rounds,
    }
    if parallel.is_rank0():
        with open(out, "w") as handle:
            json.dump(result, handle, indent=2)


def _rank_entry(rank, world, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(*args)


def _spawned(tp, repeats, quick, peer, out):
    """One process per TP rank (gloo), without the test helper's time limit."""
    import torch.multiprocessing as mp

    from megatron_minitron.parallel import free_port

    mp.start_processes(_rank_entry, args=(tp, free_port(), (tp, repeats, quick, peer, out)),
                       nprocs=tp, join=True, start_method="spawn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2-layer models, vocab 8192")
    parser.add_argument("--no-peer", action="store_true", help="skip Model Optimizer")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per rank (1: steady timings on a shared machine)")
    parser.add_argument("--output", default=os.path.join(RESULTS, "distill.json"))
    args = parser.parse_args()
    if args.worker:
        tp, repeats, quick, peer, out = args.worker
        _spawned(int(tp), int(repeats), quick == "1", peer == "1", out)
        return 0
    python = None if args.no_peer else peer_python()
    runs = {}
    for tp in args.tp:
        out = os.path.join(RESULTS, f"distill_tp{tp}.tmp")
        command = [python or sys.executable, os.path.abspath(__file__), "--worker", str(tp),
                   str(args.repeats), "1" if args.quick else "0", "1" if python else "0", out]
        started = time.time()
        subprocess.run(command, check=True, env=dict(
            os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads),
            BENCH_THREADS_PER_RANK=str(args.threads)))
        with open(out) as handle:
            runs[f"tp{tp}"] = json.load(handle)
        os.remove(out)
        runs[f"tp{tp}"]["wall_seconds"] = round(time.time() - started, 1)
        _print(runs[f"tp{tp}"])
    teacher, student = model_configs(args.quick)
    report = dict(_headline(runs, teacher, student), **{
        "benchmark": "distillation step vs teacher forward + student forward-backward",
        "command": "python bench/distill.py" + (" --quick" if args.quick else "")
        + f" --repeats {args.repeats} --threads {args.threads}",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "teacher": teacher.to_dict(), "student": student.to_dict(),
        "micro_batch": [BATCH, SEQ], "dtype": "fp32",
        "peer": PEER_PACKAGE if python else None,
        "environment": _environment(),
        "runs": runs,
    })
    os.makedirs(RESULTS, exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


def _headline(runs, teacher, student):
    """Top-level figures and the goal, as bench/run_all.py summarises them."""
    from common import matmul_weights

    figures = {}
    # a distillation step: the student's forward and backward, the teacher's forward
    step_flops = 6 * matmul_weights(student) + 2 * matmul_weights(teacher)
    for key, run in runs.items():
        ratios = run["ratio_to_teacher_fwd_plus_student_fwd_bwd"]
        figures[f"distill_step_ratio_{key}"] = ratios["distill_step"]
        if "modelopt_step" in ratios:
            figures[f"modelopt_step_ratio_{key}"] = ratios["modelopt_step"]
        figures[f"distill_step_tokens_per_s_{key}"] = run["tokens_per_second"]["distill_step"]
        figures[f"matmul_gflops_{key}"] = round(run["matmul_gflops"], 1)
        figures[f"distill_step_of_ceiling_{key}"] = round(  # of the TP group's matmul rate
            figures[f"distill_step_tokens_per_s_{key}"] * step_flops / (run["matmul_gflops"] * 1e9),
            3)
        mb = 1 << 20
        extra = {k: (v - run["peak_bytes"]["student_fwd_bwd"]) / mb
                 for k, v in run["peak_bytes"].items()}
        figures[f"distill_extra_peak_mb_{key}"] = round(extra["distill_step"], 1)
        if "modelopt_step" in extra:
            figures[f"modelopt_extra_peak_mb_{key}"] = round(extra["modelopt_step"], 1)
        if run.get("loss_only"):
            figures[f"loss_extra_peak_ratio_{key}"] = run["loss_only"]["ours"][
                "extra_peak_logits"]
    goal = "; ".join([f"distill_step_ratio_{k} <= 1.10" for k in runs]
                     + [f"loss_extra_peak_ratio_{k} <= 1.25" for k in runs
                        if f"loss_extra_peak_ratio_{k}" in figures])
    return dict(figures, goal=goal)


def _environment():
    from importlib.metadata import version

    import torch

    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({os.cpu_count()} cores)")
    return {"device": device, "torch": torch.__version__,
            "megatron_core": version("megatron-core"), "python": platform.python_version()}


def _print(run) -> None:
    print(f"TP={run['tp']}: " + ", ".join(
        f"{k} {v:.3f}s (cpu {run['cpu_seconds'][k]:.3f}s)" for k, v in run["seconds"].items()))
    for label, key in (("wall", "ratio_to_teacher_fwd_plus_student_fwd_bwd"),
                       ("cpu", "cpu_ratio_to_teacher_fwd_plus_student_fwd_bwd")):
        print(f"  {label} ratio to (teacher fwd + student fwd-bwd): " + ", ".join(
            f"{k} {v:.3f}" for k, v in run[key].items()))
    print("  extra peak over the student step, in logits tensors: " + ", ".join(
        f"{k} {v}" for k, v in run["extra_peak_over_student_step_in_logits"].items()))
    if run.get("loss_only"):
        print("  loss alone: " + ", ".join(
            f"{k} {v['seconds']:.3f}s (cpu {v['cpu_seconds']:.3f}s) / {v['extra_peak_logits']}x"
            for k, v in run["loss_only"].items()))


if __name__ == "__main__":
    sys.exit(main())
