"""Configuration of a distillation / retraining run, its command-line flags and YAML form.

    config = TrainConfig.from_args(args)           # flags > --config YAML > defaults
    config = TrainConfig(student="S", teacher="T", output="run", data_prefix=["data/web"],
                         seq_length=1024, train_tokens=10**9, global_batch_size=256)

Every field is a flag of the same name (``train_tokens`` → ``--train-tokens``) whose help is the
field's docstring; a YAML file given with ``--config`` holds the same names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_minitron.distill.losses import INTERMEDIATE_LOSSES, LOGIT_LOSSES
from megatron_minitron.errors import UsageError
from megatron_minitron.precision import TRAIN_PRECISIONS

PRECISIONS = TRAIN_PRECISIONS
RECOMPUTE = ("selective", "full")


@dataclass
class TrainConfig:
    """A distillation (teacher given) or cross-entropy training run."""

    student: Optional[str] = None
    """Checkpoint the trained model starts from (the student; for correct-teacher the teacher)."""
    teacher: Optional[str] = None
    """Teacher checkpoint; without one the model trains on cross-entropy alone."""
    output: Optional[str] = None
    """Run directory: checkpoints/, log.jsonl and final/ (the trained model)."""
    data_prefix: Optional[List[str]] = None
    """Megatron indexed dataset: PREFIX, or a blend W1 PREFIX1 W2 PREFIX2 ..."""
    text_file: Optional[List[str]] = None
    """Text / JSON lines file(s) or folder(s), tokenized at start-up (small corpora)."""
    json_key: str = "text"
    """Field holding the text in JSON lines files."""
    tokenizer: Optional[str] = None
    """Tokenizer folder; default: the one saved in the student (or teacher) checkpoint."""
    split: str = "99,1,0"
    """Train/validation/test shares of the data (documents of a data prefix, windows of text)."""
    seq_length: Optional[int] = None
    """Tokens per sample."""
    train_tokens: Optional[int] = None
    """Tokens to train on; steps = ceil(train_tokens / (global_batch_size * seq_length))."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step, over all data parallel ranks."""
    micro_batch_size: int = 1
    """Samples per forward pass on one rank (gradient accumulation makes up the rest)."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up from 0 to --lr."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16 for the student; the teacher runs in bf16
    on GPU unless fp32 is asked for."""
    loss: str = field(default="kl", metadata={"choices": LOGIT_LOSSES})
    """Logits distillation loss: kl, rkl, mse, cosine or topk_kl."""
    temperature: float = 1.0
    """Softmax temperature of the KL losses."""
    kd_weight: float = 1.0
    """Weight of the logits distillation loss."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy loss on the data labels (added to the KD loss)."""
    topk: int = 64
    """Teacher logits kept by --loss topk_kl."""
    intermediate: Optional[str] = None
    """Intermediate-state pairs TEACHER:STUDENT (1-based layer outputs, emb = embeddings), e.g.
    emb,16:8; added with weight L_logits / L_is (detached)."""
    intermediate_loss: str = field(default="cosine", metadata={"choices": INTERMEDIATE_LOSSES})
    """Loss between (projected) hidden states: cosine or mse."""
    logits_chunk_tokens: Optional[int] = None
    """Sequence positions per chunk of the logits loss (default: about 1/32 of the logits)."""
    log_interval: int = 1
    """Steps between progress lines."""
    eval_interval: int = 0
    """Steps between validation losses (0: only at the end when --eval-samples is set)."""
    eval_samples: int = 0
    """Validation samples (0 with --eval-interval: one global batch)."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept in OUTPUT/checkpoints while the run goes on."""
    keep_optimizer_state: bool = False
    """Keep OUTPUT/checkpoints (weights and optimizer state, about three times the model's
    size) after the run finished; by default only the trained model in OUTPUT/final stays."""
    resume: Optional[str] = field(default=None, metadata={"choices": ("auto",)})
    """auto: continue the run in --output from its latest checkpoint (a fresh start if none)."""
    output_format: str = field(default="minitron", metadata={"choices": ("minitron", "megatron")})
    """Format of the trained model in OUTPUT/final: minitron (ours) or megatron (a Megatron-LM
    torch_dist checkpoint, which every minitron command also loads)."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard folder (default OUTPUT/tensorboard when tensorboard is installed; 'none'
    disables)."""
    sequence_parallel: bool = False
    """Split the sequence over the tensor parallel ranks outside attention and MLP (mcore's
    sequence_parallel); needs Transformer Engine, --tp > 1 and no --intermediate."""
    recompute_activations: Optional[str] = field(default=None, metadata={"choices": RECOMPUTE})
    """Recompute activations in backward to save GPU memory: selective (the attention core) or
    full (every layer; mcore's recompute_granularity, uniform method, one layer per unit)."""
    overlap_grad_reduce: bool = False
    """Overlap the data parallel gradient reduction with backward (mcore DDP's
    overlap_grad_reduce)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward (mcore's
    overlap_param_gather); the distributed optimizer runs when data parallel size > 1."""
    tp: int = 1
    """Tensor parallel size, shared by teacher and student."""
    pp: int = 1
    """Pipeline parallel size, shared by teacher and student."""
    ep: int = field(default=1, metadata={"layout_flag": "--expert-model-parallel-size"})
    """Expert parallel size: mixture-of-experts layers (of the student and the teacher) split
    their experts over this many of the data parallel ranks."""
    seed: int = 1234
    """Seed of data order and projection initialisation."""

    def __post_init__(self):
        if self.loss not in LOGIT_LOSSES:
            raise UsageError(f"--loss {self.loss}: choose one of {', '.join(LOGIT_LOSSES)}")
        if self.intermediate_loss not in INTERMEDIATE_LOSSES:
            raise UsageError(f"--intermediate-loss {self.intermediate_loss}: choose one of "
                             f"{', '.join(INTERMEDIATE_LOSSES)}")
        if self.output_format not in ("minitron", "megatron"):
            raise UsageError(f"--output-format {self.output_format}: choose minitron or megatron")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.resume not in (None, "auto"):
            raise UsageError(f"--resume {self.resume}: the only mode is 'auto'")
        for name in ("micro_batch_size", "log_interval", "keep_checkpoints", "topk", "tp", "pp",
                     "ep"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)} must be >= 1")
        for name in ("lr_warmup_steps", "eval_interval", "eval_samples", "save_interval",
                     "weight_decay", "clip_grad", "min_lr", "kd_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)} must be >= 0")
        if not self.lr > 0 or self.min_lr > self.lr:
            raise UsageError(f"--lr {self.lr} must be > 0 and >= --min-lr {self.min_lr}")
        if not self.temperature > 0:
            raise UsageError(f"--temperature {self.temperature} must be > 0")
        if self.recompute_activations not in (None,) + RECOMPUTE:
            raise UsageError(f"--recompute-activations {self.recompute_activations}: choose one "
                             f"of {', '.join(RECOMPUTE)}")
        self.check_gpu_features()

    def check_gpu_features(self) -> None:
        """Refuses, in one line, the GPU features this machine or layout cannot run."""
        from megatron_minitron.compat.cpu import cpu_mode

        needs = {
            "sequence_parallel": "Transformer Engine (a CUDA machine with the NGC image)",
            "recompute_activations": "a CUDA machine (it trades GPU compute for GPU memory)",
            "overlap_grad_reduce": "CUDA streams and NCCL (a CUDA machine)",
            "overlap_param_gather": "CUDA streams, NCCL and the distributed optimizer (a CUDA "
                                    "machine, data parallel size > 1)",
        }
        asked = [name for name in needs if getattr(self, name)]
        if asked and cpu_mode():
            name = asked[0]
            value = getattr(self, name)
            shown = f"--{_flag(name)}" + ("" if value is True else f" {value}")
            raise UsageError(f"{shown} needs {needs[name]}; this machine has no CUDA")
        if self.sequence_parallel:
            if self.tp < 2:
                raise UsageError(f"--sequence-parallel splits the sequence over tensor parallel "
                                 f"ranks: it needs --tp > 1 (got {self.tp})")
            if self.intermediate:
                raise UsageError("--sequence-parallel with --intermediate is not supported (the "
                                 "layer outputs are split over the sequence); drop one of them")
            from megatron_minitron import adapter

            if not adapter.te_available():
                raise UsageError("--sequence-parallel needs Transformer Engine (the NGC image); "
                                 "it does not import on this machine")

    # ------------------------------------------------------------------ derived

    @property
    def distilling(self) -> bool:
        return self.teacher is not None

    def check_required(self) -> None:
        """The fields every run needs; raises one UsageError naming the first missing flag."""
        for name in ("student", "output", "seq_length", "train_tokens", "global_batch_size"):
            if getattr(self, name) in (None, ""):
                raise UsageError(f"--{_flag(name)} is required")
        if (self.data_prefix is None) == (self.text_file is None):
            raise UsageError("pass exactly one of --data-prefix and --text-file")
        for name in ("seq_length", "train_tokens", "global_batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} {getattr(self, name)} must be >= 1")
        if self.distilling and self.kd_weight == 0 and self.ce_weight == 0:
            raise UsageError("--kd-weight and --ce-weight are both 0: nothing to train on")
        if not self.distilling and self.intermediate:
            raise UsageError("--intermediate needs a --teacher")

    def train_steps(self) -> int:
        return -(-self.train_tokens // (self.global_batch_size * self.seq_length))

    def eval_sample_count(self) -> int:
        if self.eval_samples:
            return self.eval_samples
        return self.global_batch_size if self.eval_interval else 0

    def run_identity(self) -> Dict[str, Any]:
        """What must not change when a run resumes: models, data, objective and schedule."""
        keys = ("student", "teacher", "data_prefix", "text_file", "json_key", "split",
                "seq_length", "train_tokens", "global_batch_size", "lr", "min_lr",
                "lr_warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                "clip_grad", "loss", "temperature", "kd_weight", "ce_weight", "topk",
                "intermediate", "intermediate_loss", "seed")
        identity = {key: getattr(self, key) for key in keys}
        for key in ("student", "teacher"):
            if identity[key]:
                identity[key] = os.path.abspath(identity[key])
        for key in ("data_prefix", "text_file"):
            if identity[key]:
                identity[key] = [os.path.abspath(p) if os.path.exists(p) or os.path.exists(
                    p + ".idx") else p for p in identity[key]]
        return identity

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ CLI and YAML

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fixed) -> "TrainConfig":
        """Flags given on the command line > the ``--config`` YAML file > defaults."""
        values: Dict[str, Any] = {}
        if getattr(args, "config", None):
            values.update(load_yaml(args.config))
        names = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                values[name] = value
        values.update(fixed)
        return cls(**values)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> Dict[str, str]:
    """Each dataclass field's docstring (the string literal under it), from the source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, previous = {}, None
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif (previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
              and isinstance(node.value.value, str)):
            docs[previous] = " ".join(node.value.value.split())
            previous = None
        else:
            previous = None
    return docs


def _argument_type(annotation):
    """(python type, is list) of a field annotation such as ``Optional[List[str]]``."""
    hint = annotation
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, List):
        return typing.get_args(hint)[0], True
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, skip=(), aliases=None,
                         group_title: str = "training") -> None:
    """Adds one flag per TrainConfig field (except ``skip`` and the layout fields whose flag the
    command adds itself, e.g. ``ep``: ``--expert-model-parallel-size``); unset flags parse as
    None."""
    aliases = aliases or {}
    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs(TrainConfig)
    group = parser.add_argument_group(group_title)
    for item in dataclasses.fields(TrainConfig):
        if item.name in skip or "layout_flag" in item.metadata:
            continue
        kind, is_list = _argument_type(hints[item.name])
        default = item.default
        help_text = docs.get(item.name, "")
        flags = [f"--{_flag(item.name)}"] + list(aliases.get(item.name, ()))
        if kind is bool:  # --x / --no-x; absent leaves the YAML or default value
            group.add_argument(*flags, dest=item.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text.replace("%", "%%"))
            continue
        if default not in (None, dataclasses.MISSING):
            help_text += f" (default {default})"
        group.add_argument(*flags, dest=item.name, type=kind, nargs="+" if is_list else None,
                           default=None, choices=item.metadata.get("choices"),
                           help=help_text.replace("%", "%%"))
    parser.add_argument("--config", help="YAML file of these settings (flags override it)")


def load_yaml(path: str) -> Dict[str, Any]:
    """Reads a YAML mapping of TrainConfig fields (dashes or underscores)."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"--config {path} does not exist")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path} is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a mapping of settings")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"--config {path}: unknown settings {unknown}")
    for key in ("data_prefix", "text_file"):
        if isinstance(values.get(key), str):
            values[key] = values[key].split()
    return values


def check_run(config: TrainConfig, world_size: int) -> None:
    """Every check of a run that needs no checkpoint: required flags, the layout, batch
    arithmetic, the schedule and the data paths. The trainer runs it first; ``minitron run``
    runs it for every step of a recipe before the first step starts (and in ``--dry-run``)."""
    from megatron_minitron import parallel

    config.check_required()
    parallel.check_layout(config.tp, config.pp, world_size, config.ep)
    dp = world_size // (config.tp * config.pp)
    if config.overlap_param_gather and dp == 1:
        raise UsageError("--overlap-param-gather overlaps the distributed optimizer's "
                         "all-gather, which runs at data parallel size > 1; this run has "
                         "DP=1: drop the flag or use more ranks")
    group = config.micro_batch_size * dp
    if config.global_batch_size % group:
        raise UsageError(
            f"--global-batch-size {config.global_batch_size} is not divisible by "
            f"--micro-batch-size {config.micro_batch_size} × data parallel size {dp}; use "
            f"a multiple of {group}")
    if config.train_tokens < config.global_batch_size * config.seq_length:
        raise UsageError(f"--train-tokens {config.train_tokens} is less than one step "
                         f"(global batch × seq length = "
                         f"{config.global_batch_size * config.seq_length})")
    if config.lr_warmup_steps >= config.train_steps():
        raise UsageError(f"--lr-warmup-steps {config.lr_warmup_steps} must be below the "
                         f"{config.train_steps()} training steps")
    if config.text_file:
        from megatron_minitron.data.text import input_files

        files = input_files(config.text_file)  # raises for missing paths
        if all(os.path.getsize(f) == 0 for f in files):
            raise UsageError(f"--text-file {' '.join(config.text_file)} is empty: no data "
                             "to train on")
    if config.data_prefix:
        prefixes = [p for p in config.data_prefix if not _is_number(p)]
        for prefix in prefixes:
            if not os.path.isfile(prefix + ".idx"):
                raise UsageError(f"--data-prefix {prefix} has no .idx/.bin files; build them "
                                 "with `minitron preprocess-data`")


def check_models(config: TrainConfig, student, teacher=None) -> None:
    """The checks of a run that need the models' architectures (``ModelConfig``s; None where
    not known yet), not their weights: the layout against each model (TP, PP and EP divide what
    they split; EP > 1 only with mixtures of experts), the sequence length, one vocabulary, and
    sequence parallelism for a MoE student at TP > 1 (mcore trains MoE layers so only)."""
    for name, cfg in (("student", student), ("teacher", teacher)):
        if cfg is None:
            continue
        try:
            cfg.check_layout(config.tp, config.pp, config.ep)
        except ValueError as err:
            raise UsageError(f"the {name}: {err}") from None
        if config.seq_length > cfg.max_position_embeddings:
            raise UsageError(f"--seq-length {config.seq_length} exceeds the {name}'s "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
    if student is not None and student.is_moe and config.tp > 1 and \
            not config.sequence_parallel:
        raise UsageError(f"the student is a mixture of experts: Megatron-Core trains MoE layers "
                         f"at --tp {config.tp} only with --sequence-parallel; add it (a CUDA "
                         "machine) or use --expert-model-parallel-size instead of TP")
    if student is not None and teacher is not None and \
            teacher.vocab_size != student.vocab_size:
        raise UsageError(f"teacher vocab_size {teacher.vocab_size} differs from the student's "
                         f"{student.vocab_size}; distill only between models of one tokenizer")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
