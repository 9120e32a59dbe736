"""The training loop shared by distillation, teacher correction and plain retraining.

    torchrun --nproc-per-node 4 -m megatron_minitron distill --teacher T --student S \
        --data-prefix data/web --seq-length 4096 --train-tokens 100000000 \
        --global-batch-size 64 --micro-batch-size 1 --lr 1e-4 --output run --tp 2 --resume auto

    trainer = Trainer(config)      # cheap input checks (one-line UsageErrors)
    summary = trainer.run()        # process groups, models, data, steps, checkpoints

Each step runs mcore's pipeline schedule over ``global_batch / (micro_batch × DP)``
micro-batches of the co-located :class:`DistillationModel`, then mcore's optimizer (the
distributed optimizer when DP > 1) and a cosine learning-rate schedule with linear warm-up.
Losses are token sums divided once by the global token count (mcore's per-token loss mode),
so every layout optimises the same objective.

Mixture-of-experts models run at any TP×PP×DP×EP (``ep``: experts split over EP of the data
parallel ranks; mcore's DDP reduces expert gradients over the expert data parallel group). A
MoE student's routers add mcore's load-balancing loss with the checkpoint's
``moe_aux_loss_coeff``: mcore attaches it to the router output, so it enters the backward by
itself, scaled as Megatron-LM scales it (the optimizer's loss scale; in the per-token mode each
micro-batch's loss weighs 1/(micro-batches × DP)). Each step logs it as ``moe_aux_loss``
beside ``loss`` (which holds the KD / CE / intermediate part only, as in validation). A MoE
teacher runs forward-only, its routers without the loss. EP > 1 needs both models to be MoE
(dense ones distill from and into MoE ones at EP = 1), and mcore trains a MoE student at
TP > 1 only with sequence parallelism.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Dict, List, Optional

import torch

from megatron_minitron import parallel
from megatron_minitron.checkpoint.io import read_checkpoint_info
from megatron_minitron.config import ModelConfig
from megatron_minitron.distill import state
from megatron_minitron.distill.config import TrainConfig, check_models, check_run
from megatron_minitron.distill.losses import LogitLossSpec, logits_loss
from megatron_minitron.distill.model import LayerPair, check_pairs, parse_pairs
from megatron_minitron.errors import UsageError

REPORT_FIELDS = ("loss", "kd", "ce", "is", "tokens")  # sums over the step's tokens


def _checkpoint_config(path: str, flag: str) -> ModelConfig:
    try:
        info = read_checkpoint_info(path)
    except UsageError as err:
        raise UsageError(str(err).replace("--load", flag, 1)) from None
    return ModelConfig.from_dict(info["model"])


def _tokenizer_source(config: TrainConfig) -> Optional[str]:
    from megatron_minitron.checkpoint.io import tokenizer_dir

    if config.tokenizer:
        return config.tokenizer
    for path in (config.student, config.teacher):
        if path and tokenizer_dir(path):
            return path
    return None


def _vocabulary(folder: str):
    """A tokenizer folder's token → id map; read from tokenizer.json when there is one (no
    ``transformers`` import), else through ``transformers``."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        with open(path) as handle:
            data = json.load(handle)
        vocab = dict(data.get("model", {}).get("vocab") or {})
        if isinstance(vocab, dict) and vocab:
            vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
            return vocab
    from megatron_minitron.data import load_tokenizer

    return load_tokenizer(folder).get_vocab()


def check_tokenizers(config: TrainConfig) -> None:
    """Teacher and student must read the same token ids."""
    from megatron_minitron.checkpoint.io import tokenizer_dir

    folders = [tokenizer_dir(p) for p in (config.student, config.teacher)]
    if None in folders:
        return
    if _vocabulary(folders[0]) != _vocabulary(folders[1]):
        raise UsageError(f"the teacher's tokenizer ({folders[1]}) differs from the student's "
                         f"({folders[0]}); distill only between models of one tokenizer")


class Trainer:
    """One training run; see the module docstring."""

    def __init__(self, config: TrainConfig, mode: str = "distill"):
        config.check_required()
        self.config = config
        self.mode = mode
        self.student_cfg = _checkpoint_config(config.student, "--student")
        self.teacher_cfg = (_checkpoint_config(config.teacher, "--teacher")
                            if config.distilling else None)
        self.pairs: List[LayerPair] = parse_pairs(config.intermediate)
        self._check_inputs()
        self.resume_step = state.check_output(config.output, self.identity(), config.resume)

    def identity(self) -> Dict:
        return dict(self.config.run_identity(), mode=self.mode)

    # ------------------------------------------------------------------ checks

    def _check_inputs(self) -> None:
        config, student, teacher = self.config, self.student_cfg, self.teacher_cfg
        check_run(config, parallel.world_size_from_env())
        check_models(config, student, teacher)
        if teacher is not None:
            check_tokenizers(config)
            check_pairs(self.pairs, teacher, student, config.pp)
        if _tokenizer_source(config) is None and (config.text_file or config.data_prefix):
            raise UsageError("no tokenizer: the checkpoints carry none; pass --tokenizer")

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        from megatron_minitron.distill.setup import build_run

        self.run_state = build_run(self)

    # ------------------------------------------------------------------ steps

    def run_schedule(self, batches, forward_only: bool) -> torch.Tensor:
        """Runs the pipeline schedule over ``batches``; returns the step's summed
        [loss, kd, ce, is, tokens] (float64) on every rank."""
        return run_schedule(self.run_state.ddp_model, self.loss_spec, batches, forward_only)

    def train_step(self, batches) -> Dict[str, float]:
        """One optimizer step over ``batches``; returns the step's report (the means of
        :data:`REPORT_FIELDS`, ``lr``, ``grad_norm``, ``skipped`` and, for a MoE student with
        a load-balancing loss, ``moe_aux_loss``: what its routers added to the objective
        beside ``loss``)."""
        from megatron_minitron import adapter
        from megatron_minitron.compat.cpu import cuda_to_cpu

        run = self.run_state
        run.ddp_model.zero_grad_buffer()
        run.optimizer.zero_grad()
        adapter.clear_moe_aux_loss_record()
        lr = run.optimizer.param_groups[0]["lr"]
        sums = self.run_schedule(batches, forward_only=False)
        aux = moe_aux_loss(self.student_cfg.moe_aux_loss_coeff, len(batches)) \
            if self.student_aux_loss else None
        with cuda_to_cpu():
            ok, grad_norm, _ = run.optimizer.step()
        run.scheduler.step(increment=1)
        report = _means(sums)
        report.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else None,
                      skipped=not ok)
        if aux is not None:
            report["moe_aux_loss"] = aux
        return report

    @property
    def student_aux_loss(self) -> bool:
        """Whether the student's MoE routers add a load-balancing loss to its objective."""
        return self.student_cfg.is_moe and self.student_cfg.moe_aux_loss_coeff > 0

    def evaluate(self) -> Optional[Dict[str, float]]:
        run = self.run_state
        if run.valid_batches is None:
            return None
        from megatron_minitron.distill.setup import params_synced

        run.ddp_model.eval()
        try:
            with params_synced(run.ddp_model):
                sums = self.run_schedule(run.valid_batches, forward_only=True)
        finally:
            run.ddp_model.train()
        return _means(sums)

    # ------------------------------------------------------------------ loop

    def run(self) -> Dict[str, float]:
        """Trains to the end (or resumes there); returns the last step's report."""
        from megatron_minitron.distill.progress import ProgressLog

        if not hasattr(self, "run_state"):
            self.setup()
        run, config = self.run_state, self.config
        total_steps = config.train_steps()
        progress = ProgressLog(config, total_steps, run.start_step, self.tokens_per_step())
        report: Dict[str, float] = {}
        if run.start_step >= total_steps and os.path.isdir(self.final_dir()):
            parallel.log_rank0(f"{config.output} is already trained to step {total_steps}; "
                               f"the model is in {self.final_dir()}")
        try:
            for step in range(run.start_step + 1, total_steps + 1):
                batches = run.next_batches()
                started = time.perf_counter()
                report = self.train_step(batches)
                progress.step(step, report, time.perf_counter() - started)
                if config.eval_interval and step % config.eval_interval == 0 \
                        and step != total_steps:
                    progress.validation(step, self.evaluate())
                if config.save_interval and step % config.save_interval == 0 \
                        and step != total_steps:
                    self.save(step)
            if run.start_step < total_steps or not os.path.isdir(self.final_dir()):
                progress.validation(total_steps, self.evaluate())
                if config.keep_optimizer_state and \
                        state.latest_step(config.output) != total_steps:
                    self.save(total_steps)
                self.save_final(total_steps)
            if not config.keep_optimizer_state:
                parallel.barrier()
                state.drop_training_checkpoints(config.output)
        finally:
            progress.close()
        return report

    def tokens_per_step(self) -> int:
        return self.config.global_batch_size * self.config.seq_length

    def final_dir(self) -> str:
        return os.path.join(self.config.output, state.FINAL)

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int) -> None:
        from megatron_minitron.distill.setup import params_synced, save_training_checkpoint

        with params_synced(self.run_state.ddp_model):
            save_training_checkpoint(self, step)

    def save_final(self, step: int) -> None:
        from megatron_minitron.checkpoint import io, megatron_lm
        from megatron_minitron.distill.setup import params_synced

        run = self.run_state
        meta = dict(self._meta(step), role="final")
        save_checkpoint = megatron_lm.save_checkpoint if self.config.output_format == "megatron" \
            else io.save_checkpoint
        with params_synced(run.ddp_model):
            save_checkpoint(run.student, self.student_cfg, self.final_dir(), meta=meta,
                            tokenizer_from=_tokenizer_source(self.config))
        parallel.log_rank0(f"trained model written to {self.final_dir()}")

    def _meta(self, step: int) -> Dict:
        config = self.config
        return {"trained_by": self.mode, "step": step, "tokens": step * self.tokens_per_step(),
                "started_from": os.path.abspath(config.student),
                "teacher": os.path.abspath(config.teacher) if config.teacher else None,
                "loss": config.loss if config.distilling else "ce"}

    @functools.cached_property
    def loss_spec(self) -> LogitLossSpec:
        config = self.config
        return LogitLossSpec(config.loss, temperature=config.temperature,
                             kd_weight=config.kd_weight if config.distilling else 0.0,
                             ce_weight=config.ce_weight if config.distilling else 1.0,
                             topk=config.topk, chunk_tokens=config.logits_chunk_tokens)


def _forward_step(loss_spec: LogitLossSpec, data_iterator, model):
    """mcore's forward step: one micro-batch through the co-located stages; on the last stage
    the loss function gets the :class:`StageOutput`."""
    from megatron_minitron.compat.cpu import model_compute
    from megatron_minitron.model.forward import position_ids_for

    batch = next(data_iterator)
    device = parallel.device()
    tokens = batch["tokens"].to(device)  # [b, s]
    with model_compute():
        output = model(tokens, position_ids_for(tokens))
    labels = batch["labels"].to(device).t()  # [s, b]
    mask = batch["loss_mask"].to(device).t()  # [s, b]
    return output, functools.partial(_loss, loss_spec, labels, mask)


def _loss(loss_spec: LogitLossSpec, labels, mask, output):
    """Token sums of the step's loss (mcore's per-token mode divides by the global count):
    ``total = kd_weight·KD + ce_weight·CE + α·IS`` with ``α = KD / IS`` detached.

    Runs outside the CPU shim's function mode, like the model: the loss makes no CUDA calls,
    and the mode's Python hook on each of its few thousand ops (a few dozen per chunk) cost
    about 5% of a CPU training step."""
    from megatron_minitron.compat.cpu import model_compute

    with model_compute():
        return _loss_terms(loss_spec, labels, mask, output)


def _loss_terms(loss_spec: LogitLossSpec, labels, mask, output):
    from megatron_minitron import adapter

    result = logits_loss(output.student_logits, output.teacher_logits, labels, mask, loss_spec,
                         adapter.get_tp_group(), teacher_writable=True)
    total = result.total
    intermediate = torch.zeros((), dtype=torch.float64, device=total.device)
    if output.intermediate is not None:
        intermediate = (output.intermediate.double() * mask.double()).sum()
        held = intermediate.detach()
        positive = held > 0  # decided on the device: no host sync per micro-batch
        alpha = torch.where(positive, result.kd / torch.where(positive, held, 1.0), 0.0)
        total = total + alpha * intermediate
    report = torch.stack([total.detach(), result.kd, result.ce, intermediate.detach(),
                          result.tokens])
    return total, result.tokens.to(torch.int), {"sums": report}


def run_schedule(ddp_model, loss_spec: LogitLossSpec, batches, forward_only: bool):
    """mcore's pipeline schedule over ``batches`` (micro-batches of tokens/labels/loss_mask)
    with a DDP-wrapped :class:`DistillationModel`; gradients accumulate in DDP's buffers.
    Returns the summed [loss, kd, ce, is, tokens] (float64) on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_minitron import adapter
    from megatron_minitron.compat.cpu import cuda_to_cpu

    seq = batches[0]["tokens"].shape[1]
    with cuda_to_cpu(), torch.set_grad_enabled(not forward_only):
        outputs = get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, loss_spec),
            data_iterator=iter(batches), model=[ddp_model], num_microbatches=len(batches),
            seq_length=seq, micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=forward_only)
    sums = torch.zeros(len(REPORT_FIELDS), dtype=torch.float64, device=parallel.device())
    if adapter.is_last_stage():
        sums = torch.stack([o["sums"] for o in outputs]).sum(0)
    parallel.all_reduce(sums, group=adapter.get_dp_group())
    pp_group = adapter.get_pp_group()
    last = parallel.global_rank(pp_group, parallel.group_size(pp_group) - 1)
    parallel.broadcast(sums, src=last, group=pp_group)
    return sums


def moe_aux_loss(coeff: float, num_microbatches: int) -> float:
    """The load-balancing loss a MoE student's routers added to the step's objective (read
    from mcore's record, which is then dropped; collective): ``coeff`` × the sum over MoE
    layers of each layer's loss, averaged over the micro-batches and the data parallel ranks,
    which is the gradient mcore's routers give it in the per-token loss mode. (Megatron-LM logs
    the mean over MoE layers without ``coeff`` as ``load_balancing_loss``.)"""
    from megatron_minitron import adapter

    record = adapter.moe_aux_loss_record()
    total = torch.zeros((), dtype=torch.float64, device=parallel.device())
    if record is not None:  # every rank of a TP and DP group holds the same layers
        values, sum_group, dp_average = record
        total += values.detach().double().sum().to(total.device)
        if sum_group is not None:
            parallel.all_reduce(total, group=sum_group)
        if dp_average:
            dp_group = adapter.get_dp_group()
            parallel.all_reduce(total, group=dp_group)
            total /= parallel.group_size(dp_group)
    parallel.all_reduce(total, group=adapter.get_pp_group())  # stages hold different layers
    adapter.clear_moe_aux_loss_record()
    return float(total) * coeff / num_microbatches


def _means(sums: torch.Tensor) -> Dict[str, float]:
    values = dict(zip(REPORT_FIELDS, sums.tolist()))
    tokens = max(values["tokens"], 1.0)
    report = {name: values[name] / tokens for name in REPORT_FIELDS if name != "tokens"}
    report["tokens"] = int(values["tokens"])
    return report


def write_json_line(path: str, record: Dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
