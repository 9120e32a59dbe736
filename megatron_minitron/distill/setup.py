"""Building a run: process groups, teacher and student stages, DDP, optimizer, learning-rate
schedule, data; and the training checkpoints that restore all of it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from typing import Callable, Optional

import torch

from megatron_minitron import parallel
from megatron_minitron.compat.cpu import cuda_to_cpu
from megatron_minitron.distill import state
from megatron_minitron.errors import UsageError


@dataclasses.dataclass
class RunState:
    """Everything a running Trainer holds."""

    layout: parallel.Layout
    student: torch.nn.Module  # this rank's student stage (GPTModel)
    teacher: Optional[torch.nn.Module]
    model: torch.nn.Module  # DistillationModel
    ddp_model: torch.nn.Module
    optimizer: object
    scheduler: object
    start_step: int
    next_batches: Callable[[], list]
    sampler: object
    valid_batches: Optional[list]


def dtypes(precision: str):
    """(student params dtype, teacher dtype) for ``--precision``."""
    from megatron_minitron.precision import params_dtype

    dtype = params_dtype(precision)
    return dtype, dtype


def gpu_features(config, cfg, params_dtype, training: bool, dp: int):
    """(TransformerConfig overrides, DDP config overrides) of ``config``'s GPU features for a
    model of architecture ``cfg``; the teacher (``training=False``) shares the sequence
    parallelism (its hidden states travel beside the student's) but recomputes nothing."""
    from megatron_minitron.precision import gpu_fields

    return gpu_fields(cfg, params_dtype, training, dp,
                      sequence_parallel=config.sequence_parallel,
                      recompute=config.recompute_activations if training else None,
                      overlap_grad_reduce=config.overlap_grad_reduce,
                      overlap_param_gather=config.overlap_param_gather)


def _load_tokenizer(trainer):
    """Rank 0 loads the tokenizer; every rank gets it for a data prefix (as the picklable
    MegatronTokenizer mcore's datasets read), only rank 0 for text (it tokenizes)."""
    from megatron_minitron.data import MegatronTokenizer, check_tokenizer_fits, load_tokenizer
    from megatron_minitron.distill.trainer import _tokenizer_source

    tokenizer, error = None, None
    if parallel.is_rank0():
        try:
            tokenizer = load_tokenizer(_tokenizer_source(trainer.config))
            check_tokenizer_fits(tokenizer, trainer.student_cfg.vocab_size)
        except UsageError as err:
            error = str(err)
    if trainer.config.data_prefix:
        tokenizer = MegatronTokenizer(tokenizer) if tokenizer is not None else None
        tokenizer, error = parallel.broadcast_object((tokenizer, error))
    else:
        error = parallel.broadcast_object(error)
    if error:
        raise UsageError(error)
    return tokenizer


def _data(trainer, tokenizer, dp_rank: int, dp: int, start_step: int):
    from megatron_minitron.data import MicroBatchSampler
    from megatron_minitron.distill.data import indexed_data, take, text_windows

    config = trainer.config
    steps = config.train_steps()
    train_samples = steps * config.global_batch_size
    valid_samples = config.eval_sample_count()
    if config.text_file:
        data = text_windows(config.text_file, tokenizer, config.json_key, config.seq_length,
                            train_samples, valid_samples, config.split, config.seed)
    else:
        data = indexed_data(config.data_prefix, tokenizer, config.seq_length, train_samples,
                            valid_samples, config.split, config.seed,
                            cache_dir=os.path.join(config.output, "data_cache"))
    sampler = MicroBatchSampler(data.train, config.micro_batch_size, dp_rank, dp,
                                consumed_samples=start_step * config.global_batch_size)
    per_step = config.global_batch_size // (config.micro_batch_size * dp)
    iterator = iter(sampler)
    valid_batches = None
    if data.valid is not None and valid_samples:
        group = config.micro_batch_size * dp
        count = max(1, valid_samples // group)
        valid_batches = take(iter(MicroBatchSampler(data.valid, config.micro_batch_size, dp_rank,
                                                    dp)), count)
    return (lambda: take(iterator, per_step)), sampler, valid_batches


def _optimizer(trainer, ddp_model, student_dtype, dp: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = trainer.config
    opt_config = OptimizerConfig(
        optimizer="adam", lr=config.lr, min_lr=config.min_lr,
        weight_decay=config.weight_decay, adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2, adam_eps=config.adam_eps, clip_grad=config.clip_grad,
        bf16=student_dtype == torch.bfloat16, params_dtype=student_dtype,
        use_distributed_optimizer=dp > 1)
    with cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    return optimizer, lr_scheduler(optimizer, config)


def lr_scheduler(optimizer, config):
    """mcore's scheduler: linear warm-up over ``lr_warmup_steps``, then cosine to ``min_lr``.

    The warm-up starts one step in (``lr·1/(W+1)``, …, ``lr`` at step W) so the first step
    learns too; mcore's own ramp from ``init_lr=0`` would spend it at learning rate 0.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    steps = config.train_steps()
    warmup = config.lr_warmup_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=config.lr / (warmup + 1), max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=steps, lr_decay_style="cosine",
        start_wd=config.weight_decay, end_wd=config.weight_decay, wd_incr_steps=steps,
        wd_incr_style="constant")


def frozen_config(cfg):
    """The architecture a frozen (forward-only) model is built with: no load-balancing loss
    in its MoE routers, so a teacher adds nothing to the student's loss or its record."""
    if not cfg.is_moe or not cfg.moe_aux_loss_coeff:
        return cfg
    return dataclasses.replace(cfg, moe_aux_loss_coeff=0.0)


def wrap_for_training(student, teacher, student_cfg, teacher_cfg, pairs=(),
                      intermediate_kind: str = "cosine", seed: int = 1234,
                      ddp_overrides: Optional[dict] = None):
    """The co-located :class:`DistillationModel` of two stages, wrapped in mcore's DDP (the
    distributed optimizer's buffer layout when DP > 1); returns ``(model, ddp_model)``.
    ``ddp_overrides``: DistributedDataParallelConfig fields (the overlap flags)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_minitron.distill.model import DistillationModel

    model = DistillationModel(student, teacher, student_cfg, teacher_cfg, pairs,
                              intermediate_kind, seed)
    model.config.finalize_model_grads_func = finalize_model_grads
    fields = dict(overlap_grad_reduce=False,
                  use_distributed_optimizer=parallel_state.get_data_parallel_world_size() > 1)
    fields.update(ddp_overrides or {})
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, **fields)
    with cuda_to_cpu():
        ddp_model = DistributedDataParallel(model.config, ddp_config, model)
    model.config.no_sync_func = ddp_model.no_sync
    if ddp_config.overlap_grad_reduce:  # as Megatron-LM: reductions start as buckets fill
        model.config.grad_sync_func = ddp_model.start_grad_sync
    if ddp_config.overlap_param_gather:
        model.config.param_sync_func = ddp_model.start_param_sync
    return model, ddp_model


@contextlib.contextmanager
def params_synced(ddp_model):
    """Parameters up to date for evaluation or saving. With ``--overlap-param-gather`` the
    distributed optimizer's updated parameters arrive during the next forward (DDP's forward
    pre-hooks); as Megatron-LM does, the hooks are switched off (which gathers now) and back
    on afterwards."""
    if not ddp_model.ddp_config.overlap_param_gather:
        yield
        return
    ddp_model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp_model.enable_forward_pre_hook()


def build_run(trainer) -> RunState:
    """Initialises process groups and builds models, optimizer and data (collective)."""
    from megatron.core import parallel_state

    from megatron_minitron import adapter
    from megatron_minitron.checkpoint.io import load_weights

    config = trainer.config
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # per-parameter INFO lines
    for message in (r".*`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                    r"deprecated", r".*\.grad attribute of a Tensor that is not a leaf"):
        warnings.filterwarnings("ignore", message=message)  # raised inside mcore, every step
    layout = parallel.initialize(config.tp, config.pp, config.seed, ep=config.ep)
    start_step = trainer.resume_step or 0
    state.start_run(config.output, trainer.identity(), config.to_dict(), trainer.resume_step)
    tokenizer = _load_tokenizer(trainer)
    next_batches, sampler, valid_batches = _data(
        trainer, tokenizer, parallel_state.get_data_parallel_rank(), layout.dp, start_step)
    student_dtype, teacher_dtype = dtypes(config.precision)
    resume_dir = state.iteration_dir(config.output, start_step) if start_step else None
    finished = resume_dir is not None and not os.path.isdir(resume_dir)
    if finished:  # the run ended and its optimizer state was dropped: the final model only
        resume_dir = os.path.join(config.output, state.FINAL)
    student_fields, ddp_fields = gpu_features(config, trainer.student_cfg, student_dtype, True,
                                              layout.dp)
    # the loss is a token sum (mcore's per-token mode): MoE routers scale their load-balancing
    # loss to match, so its gradient is coeff·mean over micro-batches and data parallel ranks
    student_fields["calculate_per_token_loss"] = True
    student = adapter.build_gpt_model(trainer.student_cfg, params_dtype=student_dtype,
                                      init_weights=False, **student_fields)
    load_weights(student, resume_dir or config.student)
    teacher = None
    if config.distilling:
        teacher_fields, _ = gpu_features(config, trainer.teacher_cfg, teacher_dtype, False,
                                         layout.dp)
        teacher = adapter.build_gpt_model(frozen_config(trainer.teacher_cfg),
                                          params_dtype=teacher_dtype, init_weights=False,
                                          **teacher_fields)
        load_weights(teacher, config.teacher)
    model, ddp_model = wrap_for_training(student, teacher, trainer.student_cfg,
                                         trainer.teacher_cfg, trainer.pairs,
                                         config.intermediate_loss, config.seed, ddp_fields)
    optimizer, scheduler = _optimizer(trainer, ddp_model, student_dtype, layout.dp)
    # as Megatron-LM: the schedule scales the loss by the optimizer's loss scale and sets the
    # MoE load-balancing loss's gradient scale from it at every micro-batch
    model.config.grad_scale_func = optimizer.scale_loss
    if resume_dir and not finished:
        _restore(trainer, model, optimizer, scheduler, resume_dir, start_step)
    ddp_model.train()
    parallel.log_rank0(
        f"{trainer.mode}: {layout}, {config.train_steps()} steps of {config.global_batch_size}"
        f" × {config.seq_length} tokens" + (f", resuming at step {start_step}" if start_step
                                           else ""))
    return RunState(layout, student, teacher, model, ddp_model, optimizer, scheduler,
                    start_step, next_batches, sampler, valid_batches)


def _model_sharded(model):
    from megatron_minitron import adapter

    sharded = adapter.sharded_state_dict(model.student)
    sharded.update(state.projection_sharded(model))
    return sharded


def _restore(trainer, model, optimizer, scheduler, path: str, step: int) -> None:
    extra = state.read_extra_state(path)
    if extra.get("step") != step:
        raise UsageError(f"--resume: {path} records step {extra.get('step')}, not {step}")
    state.restore_projections(model, path)
    state.restore_optimizer(optimizer, _model_sharded(model), path, extra["optimizer_step"])
    scheduler.load_state_dict(extra["scheduler"])


def save_training_checkpoint(trainer, step: int) -> None:
    """Weights, projections, optimizer state and progress at ``step`` (collective)."""
    from megatron_minitron.checkpoint.io import save_checkpoint
    from megatron_minitron.distill.trainer import _tokenizer_source

    run, config = trainer.run_state, trainer.config
    model_sharded = _model_sharded(run.model)
    optimizer_sharded, optimizer_step = state.optimizer_sharded(run.optimizer, model_sharded)
    extra_sharded = dict(state.projection_sharded(run.model), **optimizer_sharded)
    extra_state = {"step": step, "consumed_samples": step * config.global_batch_size,
                   "optimizer_step": optimizer_step, "optimizer_format": state.OPTIMIZER_FORMAT,
                   "scheduler": run.scheduler.state_dict(),
                   "identity": trainer.identity()}
    save_checkpoint(run.student, trainer.student_cfg, state.iteration_dir(config.output, step),
                    meta=trainer._meta(step), extra_state=extra_state,
                    tokenizer_from=_tokenizer_source(config), extra_sharded=extra_sharded)
    state.mark_latest(config.output, step)
    state.prune_checkpoints(config.output, config.keep_checkpoints)
    parallel.barrier()
