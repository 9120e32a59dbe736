"""One pipeline stage of a student with the matching stage of its frozen teacher.

    model = DistillationModel(student, teacher, student_cfg, teacher_cfg,
                              pairs=[LayerPair(0, 0), LayerPair(16, 8)])
    output = model(tokens, position_ids)
    # non-last stage: [s, b, h_s + h_t (+1)] sent to the next stage by mcore's schedule
    # last stage:     StageOutput(student_logits, teacher_logits, intermediate_tokens)

Both models' activations travel between pipeline stages as one tensor: the student's hidden
states, the teacher's (detached) and, when intermediate pairs are distilled, one channel with
each token's intermediate loss summed so far. The schedule sends its gradient back like any
activation gradient, so an intermediate loss computed on stage 0 reaches the loss on the last
stage and its gradient flows back to stage 0. The teacher is not a registered submodule: DDP,
the optimizer and checkpoints see only the student and the projections.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.config import ModelConfig
from megatron_minitron.distill.losses import intermediate_loss
from megatron_minitron.errors import UsageError


@dataclass(frozen=True)
class LayerPair:
    """A teacher layer whose output the student layer's output is trained to match.

    Layer numbers are 1-based (the output of layer ``n``); 0 is the embedding output.
    """

    teacher: int
    student: int

    @property
    def name(self) -> str:
        return f"t{self.teacher}_s{self.student}"


def parse_pairs(text: Optional[str]) -> List[LayerPair]:
    """``"emb,16:8,32:16"`` → pairs; ``emb`` is ``0:0``."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if item == "emb":
            pairs.append(LayerPair(0, 0))
            continue
        try:
            teacher, student = (int(v) for v in item.split(":"))
        except ValueError:
            raise UsageError(f"--intermediate item {item!r} is not 'emb' or TEACHER:STUDENT "
                             "layer numbers (1-based), e.g. emb,16:8") from None
        pairs.append(LayerPair(teacher, student))
    if len(set(pairs)) != len(pairs):
        raise UsageError(f"--intermediate {text} names a pair twice")
    return pairs


def check_pairs(pairs: List[LayerPair], teacher: ModelConfig, student: ModelConfig,
                pp: int) -> None:
    """Each pair's layers must exist and sit on the same pipeline stage."""
    for pair in pairs:
        if not 0 <= pair.teacher <= teacher.num_layers:
            raise UsageError(f"--intermediate {pair.teacher}:{pair.student}: the teacher has "
                             f"layers 1..{teacher.num_layers}")
        if not 0 <= pair.student <= student.num_layers:
            raise UsageError(f"--intermediate {pair.teacher}:{pair.student}: the student has "
                             f"layers 1..{student.num_layers}")
        stages = (adapter.layer_stage(pair.teacher, teacher.num_layers, pp),
                  adapter.layer_stage(pair.student, student.num_layers, pp))
        if stages[0] != stages[1]:
            raise UsageError(
                f"--intermediate {pair.teacher}:{pair.student}: with PP={pp} the teacher layer "
                f"is on stage {stages[0]} and the student layer on stage {stages[1]}; pair "
                "layers on the same stage or use another pipeline size")


class StageOutput(NamedTuple):
    """What the last stage hands to the loss."""

    student_logits: torch.Tensor  # [s, b, v/tp]
    teacher_logits: Optional[torch.Tensor]  # [s, b, v/tp], no grad
    intermediate: Optional[torch.Tensor]  # [s, b] summed intermediate loss per token


class _HiddenCapture:
    """Forward hooks keeping layer outputs (and the embedding output) for the pairs."""

    def __init__(self, model, layer_numbers: List[int]):
        self.hidden: Dict[int, torch.Tensor] = {}
        self.handles = []
        for number in sorted(set(layer_numbers)):
            if number == 0:
                layer = adapter.decoder_layers(model)[0]
                self.handles.append(layer.register_forward_pre_hook(
                    self._input_hook(number), with_kwargs=True))
            else:
                layer = adapter.layer_by_number(model, number)
                self.handles.append(layer.register_forward_hook(self._output_hook(number)))

    def _input_hook(self, number):
        def hook(module, args, kwargs):
            self.hidden[number] = adapter.layer_hidden_input(args, kwargs)
        return hook

    def _output_hook(self, number):
        def hook(module, args, output):
            self.hidden[number] = adapter.layer_hidden_output(output)
        return hook

    def take(self) -> Dict[int, torch.Tensor]:
        hidden, self.hidden = self.hidden, {}
        return hidden

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _projection(pair: LayerPair, student_hidden: int, teacher_hidden: int, dtype,
                seed: int) -> torch.nn.Linear:
    """Linear student→teacher width map, initialised identically on every rank."""
    linear = torch.nn.Linear(student_hidden, teacher_hidden, bias=False, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1000 + pair.teacher * 37 + pair.student)
    with torch.no_grad():
        weight = torch.randn(teacher_hidden, student_hidden, generator=generator)
        linear.weight.copy_(weight / student_hidden ** 0.5)
    return linear.to(parallel.device())


class DistillationModel(torch.nn.Module):
    """Student stage (trained) + teacher stage (frozen) + intermediate-state projections.

    Args:
        student: this rank's stage of the student GPTModel.
        teacher: this rank's stage of the teacher GPTModel, or None (plain LM training).
        student_cfg, teacher_cfg: their architectures.
        pairs: intermediate layer pairs; only those on this stage are computed here.
        intermediate_kind: ``cosine`` or ``mse``.
        seed: seed of the projections' initialisation.
    """

    def __init__(self, student, teacher, student_cfg: ModelConfig,
                 teacher_cfg: Optional[ModelConfig], pairs: List[LayerPair] = (),
                 intermediate_kind: str = "cosine", seed: int = 1234):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list keeps it out of parameters() and the state dict
        self.student_hidden = student_cfg.hidden_size
        self.teacher_hidden = teacher_cfg.hidden_size if teacher is not None else 0
        self.intermediate_kind = intermediate_kind
        self.carry_intermediate = bool(pairs) and teacher is not None
        student_layers = {0} | set(adapter.stage_layer_numbers(student_cfg.num_layers))
        self.pairs = [p for p in pairs if p.student in student_layers
                      and (p.student != 0 or student.pre_process)]
        self.projections = torch.nn.ModuleDict()
        dtype = next(student.parameters()).dtype
        if teacher is not None and self.student_hidden != self.teacher_hidden:
            for pair in self.pairs:
                self.projections[pair.name] = _projection(
                    pair, self.student_hidden, self.teacher_hidden, dtype, seed)
        self._student_capture = _HiddenCapture(student, [p.student for p in self.pairs])
        self._teacher_capture = (_HiddenCapture(teacher, [p.teacher for p in self.pairs])
                                 if teacher is not None else None)
        if teacher is not None:
            teacher.eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
        # what mcore's schedule reads: the width of the tensor passed between stages
        self.config = copy.copy(student.config)
        self.config.hidden_size = self.pipeline_width
        self.config.calculate_per_token_loss = True
        self._input = None

    # ------------------------------------------------------------------ mcore hooks

    @property
    def module(self):
        """The student GPTModel: mcore's helpers look for pre_process etc. through ``.module``."""
        return self.student

    @property
    def teacher(self):
        return self._teacher[0]

    @property
    def pipeline_width(self) -> int:
        return self.student_hidden + self.teacher_hidden + int(self.carry_intermediate)

    def set_input_tensor(self, input_tensor) -> None:
        """mcore's schedule hands the previous stage's output (a list of one tensor or None)."""
        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        self._input = tensor

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ forward

    def _split_input(self):
        """[s, b, W] → student part (with grad), teacher part, carried intermediate [s, b]."""
        combined = self._input
        if combined is None:
            return None, None, None
        hs, ht = self.student_hidden, self.teacher_hidden
        student_in = combined[..., :hs]
        teacher_in = combined[..., hs:hs + ht].detach() if ht else None
        carried = combined[..., hs + ht] if self.carry_intermediate else None
        return student_in, teacher_in, carried

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor):
        student_in, teacher_in, carried = self._split_input()
        teacher_out = None
        if self.teacher is not None:
            with torch.no_grad():
                if teacher_in is not None:
                    teacher_in = teacher_in.to(next(self.teacher.parameters()).dtype)
                teacher_out = adapter.stage_forward(self.teacher, tokens, position_ids,
                                                    teacher_in)
        student_out = adapter.stage_forward(self.student, tokens, position_ids, student_in)
        intermediate = self._intermediate(carried, tokens)
        if self.student.post_process:
            return StageOutput(student_out, teacher_out, intermediate)
        parts = [student_out]
        if teacher_out is not None:
            parts.append(teacher_out.to(student_out.dtype))
        if self.carry_intermediate:
            parts.append(intermediate.to(student_out.dtype).unsqueeze(-1))
        return torch.cat(parts, dim=-1)  # [s, b, W]

    def _intermediate(self, carried: Optional[torch.Tensor],
                      tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Carried per-token intermediate loss plus this stage's pairs: [s, b] fp32."""
        if not self.carry_intermediate:
            return None
        student_hidden = self._student_capture.take()
        teacher_hidden = self._teacher_capture.take()
        total = None if carried is None else carried.float()
        for pair in self.pairs:
            hidden = student_hidden[pair.student]
            if pair.name in self.projections:
                hidden = self.projections[pair.name](hidden)
            tokens = intermediate_loss(hidden, teacher_hidden[pair.teacher],
                                       self.intermediate_kind)
            total = tokens if total is None else total + tokens
        if total is None:  # no pair on the first stage: start the channel at zero
            batch, seq = tokens.shape
            total = torch.zeros(seq, batch, device=tokens.device)
        return total

    def remove_hooks(self) -> None:
        self._student_capture.remove()
        if self._teacher_capture is not None:
            self._teacher_capture.remove()
