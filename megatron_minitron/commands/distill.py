"""``minitron distill``, ``minitron correct-teacher`` and ``minitron train``: one trainer.

    torchrun --nproc-per-node 4 -m megatron_minitron distill --teacher T --student S \
        --data-prefix data/web --seq-length 4096 --train-tokens 100000000 \
        --global-batch-size 64 --lr 1e-4 --output runs/s1 --tp 2 --resume auto
    minitron correct-teacher --load T --data-prefix data/web --seq-length 4096 \
        --train-tokens 10000000 --global-batch-size 64 --output runs/t2   # → runs/t2/final
    minitron train --ce-only --load S --text-file docs/ --seq-length 512 \
        --train-tokens 1000000 --global-batch-size 16 --output runs/s1-ce

Flags are generated from :class:`megatron_minitron.distill.config.TrainConfig`; ``--config
run.yaml`` supplies any of them.
"""

from __future__ import annotations

from megatron_minitron import parallel
from megatron_minitron.cli import add_layout_arguments
from megatron_minitron.distill.config import (
    TrainConfig,
    add_config_arguments,
    check_models,
    check_run,
)
from megatron_minitron.errors import UsageError

ALIASES = {"student": ("--load",), "precision": ("--dtype",)}
_DISTILL_ONLY = ("loss", "temperature", "kd_weight", "topk", "intermediate", "intermediate_loss")


def add_arguments(parser, name):
    if name == "distill":
        add_config_arguments(parser, skip=("tp", "pp", "seed"),
                             aliases=ALIASES)
    elif name == "correct-teacher":
        add_config_arguments(parser, skip=("tp", "pp", "seed", "teacher", "ce_weight")
                             + _DISTILL_ONLY, aliases=ALIASES)
    else:
        add_config_arguments(parser, skip=("tp", "pp", "seed"),
                             aliases=ALIASES)
        parser.add_argument("--ce-only", action="store_true",
                            help="plain cross-entropy retraining (no teacher)")
    add_layout_arguments(parser)
    parser.set_defaults(tp=None, pp=None, ep=None, seed=None)  # unset: from --config, else 1


def build_config(args) -> TrainConfig:
    """The TrainConfig of a parsed command line; raises UsageError on contradictions."""
    command = args.command
    config = TrainConfig.from_args(args)
    if command == "correct-teacher" and config.teacher:
        raise UsageError("correct-teacher fine-tunes --load on the data; it takes no --teacher")
    if command == "distill" and not config.teacher:
        raise UsageError("--teacher is required")
    if command == "train":
        if getattr(args, "ce_only", False) and config.teacher:
            raise UsageError("--ce-only trains without a teacher; drop --teacher or --ce-only")
        if not getattr(args, "ce_only", False) and not config.teacher:
            raise UsageError("train needs --teacher (distillation) or --ce-only")
    return config


def validate(args, model_config=None) -> TrainConfig:
    """Every check that needs no weights (``minitron run`` runs it for each step up front):
    flags, layout, batch arithmetic, schedule, data paths, and the layout, sequence length and
    vocab against the models where ``model_config`` knows them."""
    config = build_config(args)
    check_run(config, parallel.world_size_from_env())
    if model_config is not None:
        student = model_config(config.student)
        teacher = model_config(config.teacher) if config.teacher else None
        check_models(config, student, teacher)
    return config


def main(args) -> int:
    from megatron_minitron.distill.trainer import Trainer

    config = build_config(args)
    mode = {"distill": "distill", "correct-teacher": "correct-teacher"}.get(
        args.command, "distill" if config.teacher else "ce")
    trainer = Trainer(config, mode=mode)
    try:
        report = trainer.run()
        if parallel.is_rank0() and report:
            print(f"done: loss {report['loss']:.4f} after {config.train_steps()} steps; model in "
                  f"{trainer.final_dir()}")
    finally:
        parallel.teardown()
    return 0
